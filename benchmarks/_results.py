"""Append benchmark results to ``benchmarks/RESULTS.md``.

Each call adds one section: title, date (UTC), machine, library versions, the
command that produced the numbers, a Markdown table and free-form notes.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "RESULTS.md"
_HEADING = (
    "# keras_glmm benchmark results\n\n"
    "Sections are appended by the scripts in `benchmarks/` "
    "(see `benchmarks/_results.py`); newest last.\n"
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Platform, CPU model and core count of this machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": usable,
        "logical_cpus": os.cpu_count(),
    }


def _version(module: str) -> str | None:
    if module not in sys.modules:
        try:
            __import__(module)
        except Exception:  # noqa: BLE001 - absent or broken: not reported
            return None
    return getattr(sys.modules[module], "__version__", None)


def library_versions(extra: dict | None = None) -> dict:
    """Versions of python and the numerical stack (plus ``extra``, e.g. R/lme4)."""
    out = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "tensorflow_probability", "numpy"):
        v = _version(name)
        if v is not None:
            out[name] = v
    if extra:
        out.update({k: str(v) for k, v in extra.items() if v is not None})
    return out


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.4g}" if abs(value) >= 1e5 or (0 < abs(value) < 1e-3) else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    """Markdown table; columns in the order of the first row's keys (others appended)."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(rows[0].keys())
    for r in rows[1:]:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(str(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def append_results(
    section_title: str,
    command: str,
    rows: list[dict],
    notes: str = "",
    path=None,
    versions: dict | None = None,
) -> Path:
    """Append one results section to ``benchmarks/RESULTS.md`` (or ``path``).

    ``versions`` adds entries to the versions line (e.g. ``{"R": "4.3.2",
    "lme4": "1.1-35"}``).  Returns the path written.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    m = machine_info()
    v = library_versions(versions)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"\n## {section_title}\n",
        f"- Date: {now}",
        f"- Machine: {m['platform']}; CPU: {m['cpu']}; cores: {m['cores']}"
        + (f" (of {m['logical_cpus']})" if m["logical_cpus"] != m["cores"] else ""),
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Command: `{command}`\n",
        markdown_table(rows),
    ]
    if notes:
        parts.append(notes.rstrip() + "\n")
    text = "\n".join(parts)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        if new:
            fh.write(_HEADING)
        fh.write(text)
    return path
