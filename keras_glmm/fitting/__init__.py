"""The ways `GLMM.fit` trains a model: one *fit driver* per module.

```
driver.py       the interface: FitRequest (a fit's arguments, its in-memory data
                prepared once), FitDriver (select, fit) and the finish every fit ends on
engine.py       the engine: one VariationalSolver iteration per Keras epoch (the joint
                posterior; in-memory data the solver can take)
large_data.py   beyond the engine's rows: the engine's driver around full-batch
                mean-field coordinate ascent (keras_glmm.engine.coordinate_ascent)
stochastic.py   stochastic VI: gradient steps on the ELBO, full-batch or minibatches
                (the mean-field posterior); and a tf.data pipeline, Keras's fit as it is
files.py        stochastic VI on batches streamed from files (kg.read_csv, read_parquet)
```

**The interface.** A driver is a subclass of `driver.FitDriver` with two methods:

```python
class MyDriver(FitDriver):
    @classmethod
    def select(cls, model, request):  # this driver for the request, or None
        ...
    def fit(self, model, request):     # trains `model`; returns keras.callbacks.History
        ...
```

`GLMM.fit` packs its arguments into a `FitRequest` and asks the drivers of
`keras_glmm.model.FIT_DRIVERS` in turn; the first whose `select` returns an
instance fits. `select` may prepare the request's in-memory data
(`request.data(model)`: checks, level counts, the GLM start; done once, whoever
asks first) and may raise a ValueError when the model asked for a fit it cannot
have (`posterior="joint"` where the engine does not apply). `fit` runs Keras's
loop on the model (`FitDriver.keras_fit`) and ends with `FitDriver.finish`, which
records `converged_`, `fit_summary_` and the training data the results read, and
warns when the fit did not converge. Drivers take the model as an argument and
never import `keras_glmm.model`.

A new driver is a new module here and one line in `FIT_DRIVERS`.
"""
