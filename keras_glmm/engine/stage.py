"""What the solver asks of each of its stages: an objective of the optimizer's vector.

A stage (`LinearMixed`, `Variational`, `ExactLikelihood`) is one objective the
bounded quasi-Newton method minimizes: `objective(vector) -> (f, gradient)`, the
point it evaluated last (`last`, a typed state), the point it accepts as the
optimizer's current one (`accept`), the ELBO's parts there (`report`), and the
layout of its vector for the convergence check and the joint Hessian.
"""

import numpy as np


class Stage:
    """The defaults of a stage whose vector is the outer parameters alone (`Parameters`).

    Subclasses set `parameters`, `last` and `objective`.
    """

    phase = "variational"
    num_leading = 0  # coordinates before the outer parameters (the exact-ML phase's `beta`)

    def parameter_names(self):
        return list(self.parameters.names)

    def fixed_by_information(self):
        """How many leading coordinates the joint Hessian takes from the observed
        information rather than by differences (`covariances.JointHessian`)."""
        return 0

    def evaluated(self, vector):
        """The point at `vector`: the last one evaluated, or a new evaluation."""
        if not np.array_equal(self.last.vector, vector):
            self.objective(vector)
        return self.last

    def accept(self, vector):
        """The point at `vector`, the optimizer's current one."""
        return self.evaluated(vector)

    def report(self, point):
        """The ELBO and its parts (totals) at `point`."""
        return {"elbo": point.elbo, "expected_log_likelihood": point.expected_log_likelihood, "kl": point.kl}
