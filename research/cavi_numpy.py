"""Numpy prototype: mean-field CAVI + closed-form (VB-EM) hyperparameter updates for a
Gaussian LMM with random intercepts, optionally centering nested factors on their parent.

q(b) = prod_t prod_c N(m_tc, v_tc)  (mean-field across factors and levels)
Non-centered factor t:  b_tc ~ N(0, tau_t^2)
Centered child t (levels nested in parent factor p):  c_tc ~ N(b_p,parent(c), tau_t^2);
the child's q then holds the *total* effect c = b_parent + b_child, and the parent term
enters the likelihood only through its children (its rows get c_tc alone).

Every update maximizes the exact ELBO in one block (coordinate ascent), so the ELBO is
monotone; `elbo()` is the exact ELBO of the current q and hyperparameters.
"""

import time

import numpy as np


class Factor:
    def __init__(self, name, index, num_levels, parent=None, parent_map=None):
        self.name = name
        self.index = index  # row -> level (None for a parent that is absorbed by its children)
        self.n = num_levels
        self.parent = parent  # name of the parent factor (centered child) or None
        self.parent_map = parent_map  # child level -> parent level
        self.children = []  # (child factor) centered on this one
        self.counts = None if index is None else np.bincount(index, minlength=num_levels).astype(float)
        self.m = np.zeros(num_levels)
        self.v = np.ones(num_levels)
        self.tau2 = 1.0


class MeanFieldLMM:
    def __init__(self, X, y, factors):
        self.X, self.y = X, y
        self.factors = {f.name: f for f in factors}
        for f in factors:
            if f.parent is not None:
                self.factors[f.parent].children.append(f)
        self.n = len(y)
        self.XtX_inv_Xt = np.linalg.solve(X.T @ X, X.T)
        self.beta = self.XtX_inv_Xt @ y
        r = y - X @ self.beta
        self.sigma2 = r.var()
        for f in factors:
            f.tau2 = 0.25 * self.sigma2
            f.v[:] = 0.25 * f.tau2

    def eta_re(self):
        out = np.zeros(self.n)
        for f in self.factors.values():
            if f.index is not None:
                out += f.m[f.index]
        return out

    def sum_var(self):
        return sum(f.v[f.index].sum() for f in self.factors.values() if f.index is not None)

    def sweep(self):
        fixed = self.X @ self.beta
        eta = self.eta_re()
        for f in self.factors.values():
            prec = 1.0 / f.tau2 * np.ones(f.n)
            num = np.zeros(f.n)
            if f.index is not None:
                partial = self.y - fixed - eta + f.m[f.index]
                prec = prec + f.counts / self.sigma2
                num += np.bincount(f.index, weights=partial, minlength=f.n) / self.sigma2
            if f.parent is not None:
                p = self.factors[f.parent]
                num += p.m[f.parent_map] / f.tau2
            for c in f.children:
                prec = prec + np.bincount(c.parent_map, minlength=f.n) / c.tau2
                num += np.bincount(c.parent_map, weights=c.m, minlength=f.n) / c.tau2
            new_m = num / prec
            if f.index is not None:
                eta += (new_m - f.m)[f.index]
            f.m, f.v = new_m, 1.0 / prec
        # beta | q: least squares on the residual
        self.beta = self.XtX_inv_Xt @ (self.y - eta)

    def update_hyper(self):
        eta = self.X @ self.beta + self.eta_re()
        r = self.y - eta
        self.sigma2 = (r @ r + self.sum_var()) / self.n
        for f in self.factors.values():
            if f.parent is None:
                f.tau2 = np.mean(f.m**2 + f.v)
            else:
                p = self.factors[f.parent]
                f.tau2 = np.mean((f.m - p.m[f.parent_map]) ** 2 + f.v + p.v[f.parent_map])

    def elbo(self):
        eta = self.X @ self.beta + self.eta_re()
        r = self.y - eta
        ell = -0.5 * self.n * np.log(2 * np.pi * self.sigma2) - 0.5 * (r @ r + self.sum_var()) / self.sigma2
        kl = 0.0
        for f in self.factors.values():
            if f.parent is None:
                sq = f.m**2 + f.v
            else:
                p = self.factors[f.parent]
                sq = (f.m - p.m[f.parent_map]) ** 2 + f.v + p.v[f.parent_map]
            kl += 0.5 * np.sum(sq / f.tau2 - 1 - np.log(f.v / f.tau2))
        return ell - kl

    def fit(self, max_iter=1000, tol=1e-8, verbose=False):
        last = -np.inf
        for it in range(max_iter):
            self.sweep()
            self.update_hyper()
            e = self.elbo()
            if verbose and it % 20 == 0:
                print(it, e, self.sds())
            if abs(e - last) < tol * abs(e):
                break
            last = e
        return it + 1, e

    def sds(self):
        out = {k: np.sqrt(f.tau2) for k, f in self.factors.items()}
        out["residual"] = np.sqrt(self.sigma2)
        return out


def insteval_arrays():
    import keras_glmm as kg

    df = kg.datasets.load_insteval()
    s = df.s.cat.codes.to_numpy().astype(np.int64)
    d = df.d.cat.codes.to_numpy().astype(np.int64)
    dept = df.dept.cat.codes.to_numpy().astype(np.int64)
    X = np.stack([np.ones(len(df)), (df.service.astype(str) == "1").to_numpy(float)], 1)
    y = df.y.to_numpy(float)
    d2dept = np.zeros(d.max() + 1, np.int64)
    d2dept[d] = dept
    assert np.all(d2dept[d] == dept)  # nested
    return X, y, s, d, dept, d2dept


if __name__ == "__main__":
    X, y, s, d, dept, d2dept = insteval_arrays()
    ns, nd, ndept = s.max() + 1, d.max() + 1, dept.max() + 1
    for tol in (1e-8, 1e-10):
        for centered in (False, True):
            if centered:
                fs = [Factor("s", s, ns), Factor("d", d, nd, parent="dept", parent_map=d2dept),
                      Factor("dept", None, ndept)]
            else:
                fs = [Factor("s", s, ns), Factor("d", d, nd), Factor("dept", dept, ndept)]
            m = MeanFieldLMM(X, y, fs)
            t = time.time()
            it, e = m.fit(max_iter=5000, tol=tol)
            print(f"centered={centered} tol={tol}: iters {it}, {time.time()-t:.2f}s, ELBO {e:.3f}, "
                  f"sds {m.sds()}, beta {m.beta}")
