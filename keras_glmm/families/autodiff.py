"""A family's engine derivatives by TensorFlow autodiff, for families without analytic ones.

The engine (`keras_glmm.engine`) wants each row's expected log-likelihood and its
derivatives as float64 numpy. Families that give analytic derivatives
(``Family._derivatives``) compute them in numpy; for any other family (one a user
registers with only a ``_distribution``), and for the tests that check the
analytic derivatives, this module traces the TensorFlow expected log-likelihood
once per family, link and quadrature size and differentiates it.
"""

import tensorflow as tf

_DERIVATIVE_FUNCTIONS = {}


def derivatives_function(family, num_points, names, with_trials):
    """A traced `(y, m, v, trials, weights, *params) -> (value, d/dm, d2/dm2, d/dv, d/dparams)`.

    `num_points=0` differentiates `log_prob` at `m` (`v` unused), for
    `Family.log_prob_derivatives`.

    Families hold no state beyond their link, so one graph serves every instance of
    a family and link (`Family.expected_log_prob_derivatives`).
    """
    key = (type(family), family.link.name, int(num_points), names, with_trials)
    if key not in _DERIVATIVE_FUNCTIONS:
        vector = tf.TensorSpec([None], tf.float64)
        signature = [vector] * 5 + [tf.TensorSpec([], tf.float64)] * len(names)

        @tf.function(input_signature=signature)
        def derivatives(y, m, v, trials, weights, *params):
            named = dict(zip(names, params))
            with tf.GradientTape() as outer:
                outer.watch(m)
                with tf.GradientTape(persistent=True) as inner:
                    inner.watch(m)
                    inner.watch(v)
                    inner.watch(list(params))
                    if num_points:
                        value = family.expected_log_prob(
                            y, m, v, named, trials=trials if with_trials else None, num_points=num_points)
                    else:  # no variance: the log-likelihood itself
                        value = family.log_prob(y, m, named, trials=trials if with_trials else None)
                    total = tf.reduce_sum(value)
                    weighted = tf.reduce_sum(value * weights)
                    extra = family._weight_terms(weights, named, tf)
                    if extra is not None:
                        weighted += tf.reduce_sum(extra[0])
                first = inner.gradient(total, m)
                # Rows are independent: the gradient of the summed first derivatives
                # is each row's second derivative.
                first_sum = tf.reduce_sum(first)
            second = outer.gradient(first_sum, m)
            d_var = inner.gradient(total, v)
            d_var = tf.zeros_like(v) if d_var is None else d_var
            grads = inner.gradient(weighted, list(params)) if params else []
            grads = [tf.zeros([], tf.float64) if g is None else g for g in grads]
            return value, first, second, d_var, grads

        _DERIVATIVE_FUNCTIONS[key] = derivatives
    return _DERIVATIVE_FUNCTIONS[key]
