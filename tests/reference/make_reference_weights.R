# lme4 fits with prior weights, for tests/test_weights.py (R 4.2, lme4 1.1-31).
#   Rscript make_reference_weights.R sleep.csv grouse.csv > weights_reference.json
# sleep.csv: lme4's sleepstudy with w = 1 + Days %% 3 (precision weights).
# grouse.csv: lme4's grouseticks with w = 1 + (row - 1) %% 3 (likelihood weights),
# fitted with nAGQ = 25: the exact ML of a one-term model, as keras_glmm's.
suppressMessages({library(lme4); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
out <- list()
summarise <- function(fit, formula, family, reml, nagq = 1) {
  vc <- as.data.frame(VarCorr(fit))
  list(formula = formula, family = family, reml = reml, nAGQ = nagq,
       fixef = as.list(fixef(fit)), se = as.list(sqrt(diag(as.matrix(vcov(fit))))),
       varcorr = lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i], var1 = vc$var1[i],
                        var2 = vc$var2[i], sdcor = vc$sdcor[i])),
       logLik = as.numeric(logLik(fit)), nobs = nobs(fit))
}
sleep <- read.csv(args[1])
sleep$Subject <- factor(sleep$Subject)
f1 <- lmer(Reaction ~ Days + (Days | Subject), sleep, weights = w, REML = FALSE)
out$sleepstudy_weights <- summarise(f1, "Reaction ~ Days + (Days | Subject)", "gaussian", FALSE)
f1r <- lmer(Reaction ~ Days + (Days | Subject), sleep, weights = w, REML = TRUE)
out$sleepstudy_weights_reml <- summarise(f1r, "Reaction ~ Days + (Days | Subject)", "gaussian", TRUE)
g <- read.csv(args[2])
g$BROOD <- factor(g$BROOD); g$YEAR <- factor(g$YEAR)
f2 <- glmer(TICKS ~ YEAR + HEIGHTs + (1 | BROOD), g, family = poisson, weights = w, nAGQ = 25)
out$grouseticks_weights <- summarise(f2, "TICKS ~ C(YEAR) + HEIGHTs + (1 | BROOD)", "poisson", FALSE, 25)
out$`_about` <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
  note = paste("sleepstudy with w = 1 + Days %% 3; grouseticks with w = 1 + (row - 1) %% 3;",
               "logLik of the gaussian fits includes the weights' 0.5 sum(log w), as R's logLik."))
cat(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"))
