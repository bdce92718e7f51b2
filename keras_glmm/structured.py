"""`StructuredGLMM`: partially factorized VI for gaussian random-intercept models.

For a gaussian identity-link model whose random-effect terms are all random
intercepts, the posterior family is

```
q(beta, u, b) = delta(beta - beta_hat) N(u; mu, S) prod_t prod_c N(b_tc; m_tc(beta, u), 1 / D_tc)
```

`u` stacks the levels of the *small* terms (at most `small_threshold` levels each):
with the fixed effects they form the joint block `theta = (beta, u)`, whose
posterior over `u` has a full covariance. Each level `c` of a *large* term `t` gets
a Gaussian whose mean is linear in `theta`, `m_tc = A_tc . [1, theta]`. The fit is
coordinate ascent on the exact ELBO, one closed-form step per `train_step`:

1. one Gauss-Seidel sweep over the large terms' linear maps `A_t` (and `D_t`);
2. `theta`'s posterior in closed form (its Hessian `H` is kept: `inv(H)` restricted
   to `beta` is lme4's `(X' V^-1 X)^-1`);
3. the residual variance and every term's variance in closed form (VB-EM).

Every step maximizes the ELBO over its block, so the ELBO never decreases. The data
enter once, as per-level sufficient statistics (`Z_t' Y`, the level counts, the
cross-tabulations of each pair of large terms and `Y'Y` with
`Y = [y, -X, -Z_small]`), so a step costs O(cross-tabulation nonzeros * (1 + q))
whatever the number of rows. With at most one large term the posterior family holds
the exact posterior, and the ELBO at the optimum is the log-likelihood (lme4's ML).
With several crossed large terms only their covariance is mean-field, which biases
their sds slightly low on sparse designs.

After `fit`, the estimates are written into the standard layers (the Dense kernel,
each `RandomEffects` layer's prior scale and per-level marginal posterior, the
family head's residual scale), so `predict`, `fixef`, `ranef`, `varcorr` and
`report` work as for any `GLMM`.
"""

import math

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_glmm import results as results_lib
from keras_glmm.callbacks import ELBOConvergence
from keras_glmm.layers.random_effects import RandomEffects
from keras_glmm.model import GLMM

_F64 = tf.float64


def _softplus_inverse(x):
    x = np.asarray(x, "float64")
    return np.where(x > 30.0, x + np.log(-np.expm1(-np.minimum(x, 700.0))), np.log(np.expm1(np.minimum(x, 30.0))))


class _State:
    """Plain holder of the fit's float64 variables (kept out of Keras's weight tracking)."""


def _sufficient_statistics(X, y, large, small, small_levels, large_levels):
    """One pass over the rows: everything a coordinate-ascent step needs.

    Returns a dict with `YtY` `(1+q, 1+q)`, per large term `ZtY` `(L_t, 1+q)` and
    counts `(L_t,)`, per ordered pair of large terms its cross-tabulation
    `(i, j, count)`, the small levels' counts and the number of rows.
    """
    n, p = X.shape
    offs = np.cumsum([0] + list(small_levels))
    ks = int(offs[-1])
    # Column index (within u) of each row's level, per small term.
    small_cols = [g + offs[i] for i, g in enumerate(small)]
    # Y = [y, -X, -Z_small]; its Gram matrix without forming the indicators.
    YtY = np.zeros((1 + p + ks, 1 + p + ks))
    dense = np.concatenate([y[:, None], -X], axis=1)
    YtY[: 1 + p, : 1 + p] = dense.T @ dense
    for cols in small_cols:
        block = np.stack([np.bincount(cols, dense[:, j], ks) for j in range(1 + p)], axis=1)
        YtY[1 + p:, : 1 + p] -= block
        YtY[: 1 + p, 1 + p:] -= block.T
    for a, ca in enumerate(small_cols):
        for b, cb in enumerate(small_cols):
            counts = np.bincount(ca * ks + cb, minlength=ks * ks).reshape(ks, ks)
            YtY[1 + p:, 1 + p:] += counts
    stats = {"YtY": YtY, "n": float(n), "small_counts": np.diag(YtY)[1 + p:].copy(), "ZtY": [], "counts": [],
             "pairs": {}}
    for g, L in zip(large, large_levels):
        ZtY = np.zeros((L, 1 + p + ks))
        for j in range(1 + p):
            ZtY[:, j] = np.bincount(g, dense[:, j], L)
        for cols in small_cols:
            ZtY[:, 1 + p:] -= np.bincount(g * ks + cols, minlength=L * ks).reshape(L, ks)
        stats["ZtY"].append(ZtY)
        stats["counts"].append(np.bincount(g, minlength=L).astype("float64"))
    for t in range(len(large)):
        for u in range(len(large)):
            if u != t:
                key = large[t].astype(np.int64) * large_levels[u] + large[u]
                uniq, cnt = np.unique(key, return_counts=True)
                stats["pairs"][t, u] = (uniq // large_levels[u], uniq % large_levels[u], cnt.astype("float64"))
    return stats


@keras.saving.register_keras_serializable(package="keras_glmm")
class StructuredGLMM(GLMM):
    """A gaussian random-intercept GLMM fitted by partially factorized VI (see module doc).

    Constructed like `GLMM`, with a list of random-intercept `RandomEffects` layers
    (one effect each) and the default `Dense` fixed effects; the family must be
    gaussian with the identity link. `fit(x, y)` takes in-memory data (a dict of
    arrays, or a DataFrame for a formula model) and runs Keras's `fit` with one
    closed-form coordinate-ascent step per `train_step`; the History holds `loss`
    (-ELBO per observation), `elbo`, `nll` and `kl` (per observation).

    Args:
        random_effects: a list of `RandomEffects` random-intercept layers.
        small_threshold: terms with at most this many levels join the fixed effects
            in the joint block (full-covariance posterior); larger terms get one
            Gaussian per level with a mean linear in the joint block.
        **kwargs: as `GLMM` (`family` must be gaussian, identity link).
    """

    def __init__(self, random_effects=(), fixed_effects=None, family="gaussian", link=None,
                 small_threshold=200, **kwargs):
        super().__init__(random_effects=random_effects, fixed_effects=fixed_effects, family=family,
                         link=link, **kwargs)
        if self.family.name != "gaussian" or self.family.link.name != "identity":
            raise ValueError(
                "The structured posterior is for gaussian models with the identity link. "
                f"Received: family={self.family.name!r}, link={self.family.link.name!r}."
            )
        for layer in self.random_effects:
            if not isinstance(layer, RandomEffects):
                raise ValueError("StructuredGLMM takes RandomEffects layers, not joint layers.")
            if layer.num_effects != 1 or not layer.intercept:
                raise ValueError(
                    f"Term '{layer.name}' has random slopes: slopes are not supported by the "
                    "structured posterior yet; use posterior='joint' or 'mean_field'."
                )
            if layer.scale_prior is not None:
                raise ValueError(
                    f"Term '{layer.name}' has a `scale_prior`: the structured posterior "
                    "point-estimates the variance components (scale_prior=None)."
                )
        if not isinstance(self.fixed_effects, keras.layers.Dense) or self.fixed_effects.use_bias:
            raise ValueError("StructuredGLMM needs the default fixed effects, `Dense(1, use_bias=False)`.")
        if "scale" in self.head.fixed_params:
            raise ValueError("StructuredGLMM estimates the residual scale: do not fix it.")
        self.small_threshold = int(small_threshold)
        self._pf = None  # the fit's state (_State), set by fit
        self._pf_stats_key = None

    @property
    def posterior_kind(self):
        return "structured"

    def get_config(self):
        config = super().get_config()
        config["small_threshold"] = self.small_threshold
        return config

    def compile(self, optimizer=None, jit_compile=False, steps_per_execution=1, **kwargs):
        """As `GLMM.compile`, with one step per execution (each step is a whole CAVI sweep).

        The optimizer is never used: the steps are closed form.
        """
        if optimizer is None:
            optimizer = keras.optimizers.SGD(learning_rate=0.0)
        super().compile(optimizer=optimizer, jit_compile=jit_compile,
                        steps_per_execution=steps_per_execution, **kwargs)

    # ------------------------------------------------------------ the data
    def _split_terms(self):
        small = [t for t in self.terms if t.num_levels <= self.small_threshold]
        large = [t for t in self.terms if t.num_levels > self.small_threshold]
        return small, large

    def _statistics(self, x, y):
        if "offset" in x:
            y = np.asarray(y, "float64").reshape(-1) - np.asarray(x["offset"], "float64").reshape(-1)
        X = np.asarray(x["x"], "float64")
        y = np.asarray(y, "float64").reshape(-1)
        small, large = self._split_terms()
        stats = _sufficient_statistics(
            X, y,
            large=[np.asarray(x[t.name], "int64").reshape(-1) for t in large],
            small=[np.asarray(x[t.name], "int64").reshape(-1) for t in small],
            small_levels=[t.num_levels for t in small],
            large_levels=[t.num_levels for t in large],
        )
        return stats

    # ------------------------------------------------------------ state
    def _new_state(self, stats):
        small, large = self._split_terms()
        p = int(self.fixed_effects.kernel.shape[0])
        s = _State()
        s.p, s.T = p, len(large)
        s.small_levels = [t.num_levels for t in small]
        s.large_levels = [t.num_levels for t in large]
        s.Ks = int(sum(s.small_levels))
        s.q = p + s.Ks
        s.n = stats["n"]
        c = lambda v: tf.constant(v, _F64)
        s.YtY = c(stats["YtY"])
        s.ZtY = [c(z) for z in stats["ZtY"]]
        s.cnt = [c(v) for v in stats["counts"]]
        s.seen = [c((v > 0).astype("float64")) for v in stats["counts"]]
        s.small_seen = c((stats["small_counts"] > 0).astype("float64"))
        offs = np.cumsum([0] + s.small_levels)
        s.offs = offs
        # Which small term each column of u belongs to, as a (Ks, num_small) 0/1 matrix.
        member = np.zeros((s.Ks, len(small)))
        for i in range(len(small)):
            member[offs[i]:offs[i + 1], i] = 1.0
        s.member = c(member)
        s.pairs = {
            key: (tf.constant(i), tf.constant(j), c(w)[:, None]) for key, (i, j, w) in stats["pairs"].items()
        }
        q1 = 1 + s.q
        s.A = [tf.Variable(tf.zeros([L, q1], _F64), trainable=False) for L in s.large_levels]
        s.D = [tf.Variable(tf.ones([L], _F64), trainable=False) for L in s.large_levels]
        s.theta = tf.Variable(tf.zeros([s.q], _F64), trainable=False)
        s.H = tf.Variable(tf.eye(s.q, dtype=_F64), trainable=False)
        s.log_sigma2 = tf.Variable(tf.zeros([], _F64), trainable=False)
        s.log_tau2 = tf.Variable(tf.zeros([s.T], _F64), trainable=False)
        s.log_tau2_small = tf.Variable(tf.zeros([len(small)], _F64), trainable=False)
        s.last = tf.Variable(tf.fill([2], tf.constant(np.nan, _F64)), trainable=False)  # ell, kl
        return s

    def _initialize_state(self, s, stats, warm):
        p = s.p
        YtY = stats["YtY"]
        small, large = self._split_terms()
        if warm:
            sigma2 = float(self.dispersion()["scale"]) ** 2
            tau2_large = [float(t.prior_stddev()[0]) ** 2 for t in large]
            tau2_small = [float(t.prior_stddev()[0]) ** 2 for t in small]
            beta = self.fixed_effects.get_weights()[0].reshape(-1).astype("float64")
            u = np.concatenate([t.conditional_mean()[:, 0] for t in small]) if small else np.zeros(0)
        else:
            # Start from OLS: residual variance, and a quarter of it for every term.
            XtX, Xty = YtY[1:1 + p, 1:1 + p], -YtY[1:1 + p, 0]
            beta = np.linalg.lstsq(XtX, Xty, rcond=None)[0]
            rss = YtY[0, 0] - 2 * beta @ Xty + beta @ XtX @ beta
            sigma2 = max(rss / stats["n"], 1e-12)
            tau2_large = [0.25 * sigma2] * s.T
            tau2_small = [0.25 * sigma2] * len(small)
            u = np.zeros(s.Ks)
        s.log_sigma2.assign(np.log(sigma2))
        s.log_tau2.assign(np.log(np.maximum(tau2_large, 1e-12)).reshape(-1))
        s.log_tau2_small.assign(np.log(np.maximum(tau2_small, 1e-12)).reshape(-1))
        s.theta.assign(np.concatenate([beta, u]))

    # ------------------------------------------------------------ the step
    def _cross(self, s, t, u, A_u):
        i, j, w = s.pairs[t, u]
        return tf.math.unsorted_segment_sum(tf.gather(A_u, j) * w, i, s.large_levels[t])

    def _cavi_step(self):
        """One coordinate-ascent sweep; returns the ELBO's parts (totals) after it."""
        s = self._pf
        p, T = s.p, s.T
        n = tf.constant(s.n, _F64)
        sigma2, tau2 = tf.exp(s.log_sigma2), tf.exp(s.log_tau2)
        tau2_small = tf.exp(s.log_tau2_small)
        # 1. Linear maps of the large terms' conditional means (one Gauss-Seidel sweep).
        A = [tf.convert_to_tensor(a) for a in s.A]
        Ds = []
        for t in range(T):
            D = s.cnt[t] / sigma2 + 1.0 / tau2[t]
            partial = s.ZtY[t]
            for u in range(T):
                if u != t:
                    partial = partial - self._cross(s, t, u, A[u])
            A[t] = partial / (sigma2 * D[:, None])
            Ds.append(D)
        # 2. The joint block theta = (beta, u): profile quadratic RR of [1, theta].
        RR = s.YtY
        for t in range(T):
            M = tf.matmul(s.ZtY[t], A[t], transpose_a=True)
            RR = RR - M - tf.transpose(M) + tf.matmul(A[t] * s.cnt[t][:, None], A[t], transpose_a=True)
            for u in range(T):
                if u != t:
                    RR = RR + tf.matmul(A[t], self._cross(s, t, u, A[u]), transpose_a=True)
        GtG = RR[1:, 1:]
        H = GtG / sigma2
        g = RR[1:, 0] / sigma2
        for t in range(T):
            A0, A1 = A[t][:, 0], A[t][:, 1:]
            H += tf.matmul(A1, A1, transpose_a=True) / tau2[t]
            g += tf.linalg.matvec(A1, A0, transpose_a=True) / tau2[t]
        prior_u = tf.linalg.matvec(s.member, 1.0 / tau2_small)
        H += tf.linalg.diag(tf.concat([tf.zeros([p], _F64), prior_u], 0))
        theta = -tf.linalg.cholesky_solve(tf.linalg.cholesky(H), g[:, None])[:, 0]
        if s.Ks:
            Huu_chol = tf.linalg.cholesky(H[p:, p:])
            S = tf.linalg.cholesky_solve(Huu_chol, tf.eye(s.Ks, dtype=_F64))
            logdet_S = -2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(Huu_chol)))
        else:
            S = tf.zeros([0, 0], _F64)
            logdet_S = tf.zeros([], _F64)
        th1 = tf.concat([tf.ones([1], _F64), theta], 0)
        # Expected residual sum of squares and second moments of the effects.
        err = tf.tensordot(th1, tf.linalg.matvec(RR, th1), 1) + tf.reduce_sum(GtG[p:, p:] * S)
        sq = err
        Eb2 = []
        for t in range(T):
            sq += tf.reduce_sum(s.cnt[t] / Ds[t])
            m = tf.linalg.matvec(A[t], th1)
            Au = A[t][:, 1 + p:]
            Eb2.append(m * m + tf.reduce_sum(tf.matmul(Au, S) * Au, 1) + 1.0 / Ds[t])
        mu = theta[p:]
        S_diag = tf.linalg.diag_part(S)
        Eu2 = mu * mu + S_diag
        # 3. Variance components (M-step), over the levels seen in the data.
        new_sigma2 = sq / n
        new_tau2 = tf.stack(
            [tf.reduce_sum(e * w) / tf.maximum(tf.reduce_sum(w), 1.0) for e, w in zip(Eb2, s.seen)]
        ) if T else tf.zeros([0], _F64)
        if s.Ks:
            seen_per_term = tf.linalg.matvec(s.member, s.small_seen, transpose_a=True)
            new_tau2_small = tf.linalg.matvec(s.member, Eu2 * s.small_seen, transpose_a=True) / tf.maximum(
                seen_per_term, 1.0)
        else:
            new_tau2_small = tf.zeros([0], _F64)
        new_tau2 = tf.maximum(new_tau2, 1e-300)
        new_tau2_small = tf.maximum(new_tau2_small, 1e-300)
        # The ELBO at the updated state (levels without rows keep q = prior: KL 0).
        ell = -0.5 * n * tf.math.log(2 * np.pi * new_sigma2) - 0.5 * sq / new_sigma2
        kl = tf.zeros([], _F64)
        for t in range(T):
            kl += 0.5 * tf.reduce_sum(s.seen[t] * (Eb2[t] / new_tau2[t] - 1.0 + tf.math.log(Ds[t] * new_tau2[t])))
        if s.Ks:
            pp = tf.linalg.matvec(s.member, 1.0 / new_tau2_small)
            unseen = 1.0 - s.small_seen
            logdet_seen = logdet_S - tf.reduce_sum(unseen * tf.math.log(S_diag))
            kl += 0.5 * (tf.reduce_sum(s.small_seen * (Eu2 * pp - 1.0 - tf.math.log(pp))) - logdet_seen)
        for a, v in zip(s.A, A):
            a.assign(v)
        for d, v in zip(s.D, Ds):
            d.assign(v)
        s.theta.assign(theta)
        s.H.assign(H)
        s.log_sigma2.assign(tf.math.log(new_sigma2))
        s.log_tau2.assign(tf.math.log(new_tau2))
        s.log_tau2_small.assign(tf.math.log(new_tau2_small))
        s.last.assign(tf.stack([ell, kl]))
        return ell, kl

    def train_step(self, data):
        ell, kl = self._cavi_step()
        n = tf.constant(self._pf.n, _F64)
        elbo = ell - kl
        # float64 logs: `residual_sd` also keeps Keras from replacing them with its
        # (float32, never updated) metric trackers of the same names.
        return {"loss": -elbo / n, "elbo": elbo / n, "nll": -ell / n, "kl": kl / n,
                "residual_sd": tf.exp(0.5 * self._pf.log_sigma2)}

    # ------------------------------------------------------------ fit
    def fit(self, x=None, y=None, epochs=None, verbose=0, callbacks=None, initialize=True, **kwargs):
        """Fits by coordinate ascent inside Keras's `fit` (in-memory data only).

        Args:
            x: a dict of arrays, or a DataFrame for a formula model.
            y: the response (for a DataFrame, the weights as in `GLMM.fit`).
            epochs: at most this many steps (one step per epoch; default 1000).
            callbacks: Keras callbacks; an `ELBOConvergence` (default tolerance 1e-9
                per observation, no learning-rate changes) stops the fit.
            initialize: start from OLS on the first fit (later fits continue from the
                current estimates).

        Returns:
            The Keras `History`.
        """
        for key in ("batch_size", "sample_weight", "steps_per_epoch"):
            if kwargs.get(key) is not None:
                raise ValueError(f"StructuredGLMM.fit is full-batch on in-memory data: `{key}` is not supported.")
            kwargs.pop(key, None)
        x, y = self._fit_inputs(x, y)
        if not isinstance(x, dict):
            raise ValueError("StructuredGLMM.fit takes in-memory data: a dict of arrays or a DataFrame.")
        x, y, _ = self.prepare(x, y, initialize=False)
        stats = self._statistics(x, y)
        warm = self._pf is not None or not initialize
        self._pf = self._new_state(stats)
        self._initialize_state(self._pf, stats, warm=warm)
        self._pf_cache = (x, y, stats)
        # Keras retraces train_step per fit: the state's variables are new each time.
        self.train_function = None
        self.make_train_function(force=True)
        callbacks = list(callbacks or [])
        convergence = next((c for c in callbacks if isinstance(c, ELBOConvergence)), None)
        if convergence is None:
            convergence = ELBOConvergence(tolerance=1e-9, patience=2, reduce_below=-math.inf)
            callbacks.append(convergence)
        dataset = tf.data.Dataset.from_tensors((np.zeros((1,)), np.zeros((1,)))).repeat()
        history = keras.Model.fit(
            self, dataset, epochs=epochs or 1000, steps_per_epoch=1, verbose=verbose,
            callbacks=callbacks, shuffle=False, **kwargs,
        )
        self._write_results()
        self._pf_vcov = None
        self._finish_fit(x, y, history, convergence, callbacks)  # one step per epoch
        return history

    def _summarize_fit(self, x, y, history):
        super()._summarize_fit(x, y, history)
        # Exact when at most one term is outside the joint block (see the module docstring).
        _, large = self._split_terms()
        self.fit_summary_["exact"] = len(large) <= 1

    # ------------------------------------------------------------ results
    def _write_results(self):
        """Writes the fit into the Dense kernel, the terms' weights and the head."""
        s = self._pf
        p = s.p
        theta = s.theta.numpy()
        S = np.linalg.inv(s.H.numpy()[p:, p:]) if s.Ks else np.zeros((0, 0))
        kernel = self.fixed_effects.kernel
        kernel.assign(theta[:p].reshape(kernel.shape).astype(kernel.dtype))
        self.head.set_params({"scale": float(np.exp(0.5 * s.log_sigma2.numpy()))})
        small, large = self._split_terms()
        th1 = np.concatenate([[1.0], theta])
        tau2_small = np.exp(s.log_tau2_small.numpy())
        tau2_large = np.exp(s.log_tau2.numpy())
        for i, term in enumerate(small):
            sl = slice(s.offs[i], s.offs[i + 1])
            self._write_term(term, tau2_small[i], theta[p:][sl], np.sqrt(np.diag(S)[sl]))
        for t, term in enumerate(large):
            A = s.A[t].numpy()
            mean = A @ th1
            Au = A[:, 1 + p:]
            var = 1.0 / s.D[t].numpy() + np.einsum("ij,jk,ik->i", Au, S, Au)
            self._write_term(term, tau2_large[t], mean, np.sqrt(var))

    @staticmethod
    def _write_term(term, tau2, mean, sd):
        tau = math.sqrt(max(float(tau2), 1e-300))
        seen = term.level_counts.numpy() > 0
        mean = np.where(seen, mean, 0.0)
        sd = np.where(seen, sd, tau)
        scale = float(term.effect_scale_weight.numpy()[0])
        term.log_scale.assign(np.array([math.log(tau)], term.log_scale.dtype))
        dtype = term.posterior_mean.dtype
        term.posterior_mean.assign((mean / scale).reshape(-1, 1).astype(dtype))
        raw = _softplus_inverse(np.maximum(sd / scale - 1e-6, 1e-12))
        term.posterior_scale_tril.assign(raw.reshape(-1, 1).astype(dtype))

    def elbo(self, x, y):
        """The PF-VI ELBO of the data at the fitted posterior (totals, not per row).

        Returns:
            A dict with `elbo`, `expected_log_likelihood` and `kl`.
        """
        if self._pf is None:
            raise ValueError("The model has not been fitted: call `fit` first.")
        cached = getattr(self, "_pf_cache", None)
        if cached is not None and cached[0] is x and cached[1] is y:
            ell, kl = (float(v) for v in self._pf.last.numpy())
            return {"elbo": ell - kl, "expected_log_likelihood": ell, "kl": kl}
        else:
            x, y, _ = self.prepare(x, y, initialize=False)
            stats = self._statistics(x, y)
        # Evaluate on a copy of the state: one more sweep from the fitted state, whose
        # ELBO is the fitted one up to the convergence tolerance.
        saved = self._pf
        probe = self._new_state(stats)
        for a, b in zip(probe.A, saved.A):
            a.assign(b)
        for a, b in zip([probe.theta, probe.log_sigma2, probe.log_tau2, probe.log_tau2_small],
                        [saved.theta, saved.log_sigma2, saved.log_tau2, saved.log_tau2_small]):
            a.assign(b)
        self._pf = probe
        try:
            ell, kl = self._cavi_step()
        finally:
            self._pf = saved
        ell, kl = float(ell), float(kl)
        return {"elbo": ell - kl, "expected_log_likelihood": ell, "kl": kl}

    def vcov(self):
        """Covariance of the fixed effects, lme4's `(X' V^-1 X)^-1` at the fitted variances.

        With at most one large term it is `inv(H)` of the joint block (exact: that
        term's linear maps are recomputed in closed form at every step). With several
        large terms the maps' slopes in `beta` converge much more slowly than the
        ELBO (Gauss-Seidel across crossed factors), so `inv(H)` can understate the
        SEs at the ELBO's convergence; then it is the sparse Schur complement of
        `results.fixed_vcov` at the fitted variance components, which is exact.
        """
        x, y = self._require_fit()
        p = self._pf.p
        names = results_lib.fixed_names(self)
        if self._pf.T <= 1:
            cov = np.linalg.inv(self._pf.H.numpy())[:p, :p]
        else:
            if getattr(self, "_pf_vcov", None) is None:  # one sparse LU per fit
                self._pf_vcov = results_lib.fixed_vcov(self, x, y)
            cov = self._pf_vcov
        return pd.DataFrame(cov, index=names, columns=names)
