"""Run an R fit on a data frame through Rscript and read its JSON result line."""

import json
import os
import shutil
import subprocess
import sys
import tempfile


def run_rscript(script, data, name, timeout=None):
    """Writes `data` to a CSV, runs `script` on it, returns the last output line as JSON.

    Args:
        script: R source that reads the CSV named by its first argument and prints
            one JSON line last.
        data: the pandas DataFrame to fit.
        name: what the fit is called in the message of a failure ("lme4", "glmer").
        timeout: seconds, or None.

    Returns:
        The parsed JSON, or None when Rscript is not installed or the fit fails.
    """
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        csv = os.path.join(tmp, "data.csv")
        data.to_csv(csv, index=False)
        path = os.path.join(tmp, "fit.R")
        with open(path, "w") as f:
            f.write(script)
        out = subprocess.run(["Rscript", path, csv], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        print(f"{name} failed:", out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])
