"""Serve a fitted GLMM: export a SavedModel and answer a request with raw columns.

The export is a TensorFlow Serving model directory (`<name>/<version>/`): start a
server with

    tensorflow_model_server --rest_api_port=8501 --model_name=sleepstudy \
        --model_base_path=$PWD/examples/output/serving/sleepstudy

and POST the request printed below to
http://localhost:8501/v1/models/sleepstudy:predict . Here the same SavedModel is
loaded in-process, as TF Serving would load it, and queried with that request.

Run: `.venv/bin/python examples/serving.py`.
"""

import json
from pathlib import Path

import pandas as pd
import tensorflow as tf

import keras_glmm as kg

EXPORT_DIR = Path(__file__).resolve().parent / "output" / "serving" / "sleepstudy" / "1"


def main():
    fit = kg.glmm("Reaction ~ Days + (Days | Subject)", kg.datasets.load_sleepstudy())
    inputs = fit.export(EXPORT_DIR)
    print(f"SavedModel written to {EXPORT_DIR}; serving inputs: {inputs}")

    # Raw columns, as a client has them: subject 308 is known, 999 is new.
    rows = pd.DataFrame({"Days": [0.0, 9.0, 9.0], "Subject": ["308", "308", "999"]})
    features = kg.serving.serving_features(fit, rows)
    body = {"inputs": {k: v.tolist() for k, v in features.items()}}
    print("REST request body:", json.dumps(body))

    served = tf.saved_model.load(str(EXPORT_DIR)).signatures["serving_default"]
    out = served(**{k: tf.constant(v) for k, v in features.items()})
    table = rows.assign(
        served_mean=out["mean"].numpy(),
        live_model=fit.predict_response(rows),
        population=fit.predict_response(rows, re_form="~0"),
    )
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
