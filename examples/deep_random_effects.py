"""A network inside a GLMM, on InstEval: strings in, level names in, a SavedModel out.

InstEval (73,421 lecture ratings, lme4): the rating `y` depends on the student's
age group `studage`, the lecture's age `lectage`, `service` and the department
`dept`, through a small network taking the department's name as a string
(`keras.layers.StringLookup` inside the network); students `s` and lecturers `d`
are random intercepts, addressed by their names (`RandomEffects(vocabulary=...)`).

`kg.GLMM(fixed_effects=network, ...)` fits it by stochastic VI on the ELBO with
the default `fit`: minibatches, natural-gradient steps of the students' and
lecturers' posteriors, Adam for the network and the residual sd, an M-step of the
two sds each epoch, and `ELBOConvergence`. Then:

- `predict_response` on rows of new students (a name not in the vocabulary gets
  the population value, as lme4's `allow.new.levels`);
- `model.export(...)`: a SavedModel whose `serving_default` takes the raw columns
  (names as strings) and returns `mean` and `eta`;
- `.keras` save and load under `safe_mode`.

Run: `python examples/deep_random_effects.py` (about 30 s on 2 cores).
"""

import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import keras_glmm as kg


def network(departments):
    ages = keras.Input((2,), name="ages")           # studage, lectage (numeric)
    service = keras.Input((1,), name="service")
    dept = keras.Input((1,), dtype="string", name="dept")
    one_hot = keras.layers.StringLookup(vocabulary=departments, output_mode="one_hot")(dept)
    h = keras.layers.Concatenate()([ages, service, one_hot])
    h = keras.layers.Dense(32, activation="relu")(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    return keras.Model({"ages": ages, "service": service, "dept": dept}, keras.layers.Dense(1)(h))


def inputs(frame):
    return {
        "ages": frame[["studage", "lectage"]].astype(float).to_numpy("float32"),
        "service": frame[["service"]].astype(float).to_numpy("float32"),
        "dept": frame[["dept"]].astype(str).to_numpy(),
        "s": frame["s"].astype(str).to_numpy(),
        "d": frame["d"].astype(str).to_numpy(),
    }


def main():
    keras.utils.set_random_seed(0)
    data = kg.datasets.load_insteval()
    train = data.sample(frac=0.8, random_state=0)
    test = data.drop(train.index)
    departments = sorted(data["dept"].astype(str).unique())
    students = kg.RandomEffects(vocabulary=sorted(train["s"].astype(str).unique()), name="s")
    lecturers = kg.RandomEffects(vocabulary=sorted(train["d"].astype(str).unique()), name="d")
    model = kg.GLMM(fixed_effects=network(departments), random_effects=[students, lecturers])

    start = time.perf_counter()
    model.fit(inputs(train), train["y"].to_numpy("float32"))
    print(f"fit: {time.perf_counter() - start:.1f} s, {model.fit_summary_['epochs']} epochs, "
          f"converged: {model.converged_}")
    print(f"sd students {students.prior_stddev()[0]:.3f}, sd lecturers {lecturers.prior_stddev()[0]:.3f}, "
          f"residual sd {model.dispersion()['scale']:.3f}")

    mean = model.predict_response(inputs(test))
    mse = float(np.mean((test["y"].to_numpy() - mean) ** 2))
    print(f"test MSE {mse:.4f} (variance of y: {test['y'].var():.4f})")

    with tempfile.TemporaryDirectory() as tmp:
        signature = model.export(f"{tmp}/served")
        serve = tf.saved_model.load(f"{tmp}/served").signatures["serving_default"]
        request = {k: tf.constant(v[:5]) for k, v in inputs(test).items()}
        print("SavedModel inputs:", signature, "->", np.round(serve(**request)["mean"].numpy(), 3))
        request["s"] = tf.constant(["a new student"] * 5)
        print("new students (population value):", np.round(serve(**request)["mean"].numpy(), 3))
        model.save(f"{tmp}/model.keras")
        loaded = keras.models.load_model(f"{tmp}/model.keras")
        same = np.allclose(loaded.predict_response(inputs(test.iloc[:100])), mean[:100], rtol=1e-5)
        print(".keras round trip reproduces the predictions:", same)


if __name__ == "__main__":
    main()
