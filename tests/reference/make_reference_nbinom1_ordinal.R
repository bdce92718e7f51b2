# Reference fits for the nbinom1 and ordinal families and for the gamma family's residual row.
# Output: nbinom1_ordinal_reference.json beside this script. Run from this folder:
#   Rscript make_reference_nbinom1_ordinal.R
# Needs R with glmmTMB, ordinal, lme4, jsonlite (Debian: r-cran-glmmtmb r-cran-ordinal r-cran-lme4
# r-cran-jsonlite). Numbers made with R 4.2.2, glmmTMB 1.1.5, ordinal 2022.11.16, lme4 1.1-31.
#
# 1. glmmTMB's nbinom1 (variance mu (1 + phi), sigma(fit) = phi) on the Salamanders and Owls CSV
#    files of ../data (written by make_reference_glmmtmb.R), by maximum likelihood (Laplace).
# 2. ordinal::clmm on its wine data (exported to keras_glmm/datasets/data/wine.csv, read back):
#    rating ~ temp + contact + (1|judge), cumulative logit and probit, Laplace (clmm's default) and
#    adaptive Gauss-Hermite quadrature with 25 nodes (nAGQ = 25, the exact ML to 1e-6).
#    clmm's eta: logit P(y <= k) = theta_k - x' beta - b_judge; no intercept, K - 1 thresholds.
# 3. lme4's glmer Gamma fit of MASS's Sitka (../data/sitka.csv): as.data.frame(VarCorr(fit)) has a
#    Residual row whose sd is sigma(fit); for glmer that is sqrt(pwrss / n), a penalized Pearson
#    moment estimate of the coefficient of variation, not the ML one (glmmTMB's sigma(fit)).
suppressMessages({library(glmmTMB); library(ordinal); library(lme4); library(jsonlite)})
data_dir <- file.path("..", "data")
wine_csv <- file.path("..", "..", "keras_glmm", "datasets", "data", "wine.csv")

read <- function(path, factors) {
  d <- read.csv(path, stringsAsFactors = FALSE)
  for (f in factors) d[[f]] <- factor(d[[f]], levels = sort(unique(d[[f]])))
  d
}
out <- list()

## ------------------------------------------------------------------ 1. nbinom1
nb1 <- function(case, data, factors, formula) {
  d <- read(file.path(data_dir, paste0(data, ".csv")), factors)
  fit <- glmmTMB(as.formula(formula), data = d, family = nbinom1(), REML = FALSE)
  vc <- VarCorr(fit)$cond
  sds <- lapply(names(vc), function(g) list(grp = g, var1 = "(Intercept)", sdcor = unname(attr(vc[[g]], "stddev")[1])))
  out[[case]] <<- list(
    data = paste0(data, ".csv"), formula = formula, family = "nbinom1", link = "log",
    fixef = as.list(fixef(fit)$cond), se = as.list(sqrt(diag(vcov(fit)$cond))),
    varcorr = sds, sigma = sigma(fit), dispersion = list(dispersion = sigma(fit)),
    logLik = as.numeric(logLik(fit)), nobs = nobs(fit), pdHess = fit$sdr$pdHess)
}
nb1("salamanders_nbinom1", "salamanders", c("site", "spp", "mined"), "count ~ spp + mined + (1|site)")
nb1("owls_nbinom1", "owls", c("Nest", "FoodTreatment", "SexParent"),
    "SiblingNegotiation ~ FoodTreatment + ArrivalTime + SexParent + offset(logBroodSize) + (1|Nest)")

## ------------------------------------------------------------------ 2. ordinal
if (!identical(Sys.getenv("SKIP_EXPORT"), "1")) {
  w <- ordinal::wine
  for (c in names(w)) if (is.factor(w[[c]])) w[[c]] <- as.character(w[[c]])
  write.csv(w, wine_csv, row.names = FALSE)
}
wine <- read(wine_csv, c("temp", "contact", "judge"))
wine$rating <- factor(wine$rating, levels = 1:5, ordered = TRUE)
for (link in c("logit", "probit")) for (nagq in c(1, 25)) {
  fit <- clmm(rating ~ temp + contact + (1|judge), data = wine, link = link, nAGQ = nagq)
  se <- sqrt(diag(vcov(fit)))
  out[[sprintf("wine_clmm_%s_%s", link, if (nagq == 1) "laplace" else "agq25")]] <- list(
    data = "wine.csv", formula = "rating ~ temp + contact + (1|judge)", family = "ordinal", link = link,
    nAGQ = nagq, fixef = as.list(fit$beta), se = as.list(se[names(fit$beta)]),
    thresholds = as.list(fit$alpha), thresholds_se = as.list(se[names(fit$alpha)]),
    varcorr = list(list(grp = "judge", var1 = "(Intercept)", sdcor = unname(fit$ST$judge[1, 1]))),
    logLik = as.numeric(logLik(fit)), nobs = nobs(fit), df = attr(logLik(fit), "df"))
}

## ------------------------------------------------------------------ 3. gamma's Residual row
si <- read(file.path(data_dir, "sitka.csv"), c("tree", "treat"))
g <- glmer(size ~ treat + t + I(t^2) + (1|tree), data = si, family = Gamma(link = "log"))
vc <- as.data.frame(VarCorr(g))
out[["sitka_gamma_log_lme4"]] <- list(
  data = "sitka.csv", formula = "size ~ treat + t + I(t**2) + (1|tree)", formula_r = "size ~ treat + t + I(t^2) + (1|tree)", family = "gamma", link = "log",
  engine = "lme4::glmer (Laplace)", varcorr = lapply(seq_len(nrow(vc)), function(i) as.list(vc[i, ])),
  sigma = sigma(g), pwrss = unname(g@devcomp$cmp[["pwrss"]]), nobs = nobs(g),
  sigma_glmmTMB = sigma(glmmTMB(size ~ treat + t + I(t^2) + (1|tree), data = si, family = Gamma(link = "log"))))

out[["_about"]] <- list(
  R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
  ordinal = as.character(packageVersion("ordinal")), lme4 = as.character(packageVersion("lme4")),
  nbinom1 = "glmmTMB nbinom1: variance mu (1 + phi); dispersion = phi = sigma(fit)",
  ordinal_model = "clmm: P(y <= k) = F(theta_k - x' beta - b_judge); thresholds = fit$alpha ('1|2', ...), fixef = fit$beta, sd = fit$ST$judge")
write(toJSON(out, auto_unbox = TRUE, digits = I(11), pretty = TRUE, null = "null", na = "null"),
      "nbinom1_ordinal_reference.json")
