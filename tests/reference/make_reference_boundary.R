# lme4's fit of tests/reference/rank_one_boundary.csv (simulated: 15 groups of 6 rows,
# a random slope equal to -0.6 times the random intercept, residual sd 0.8; numpy
# seed 4, see tests/test_convergence.py). The ML covariance is rank one: lme4 puts
# the correlation at exactly -1 and isSingular() is TRUE.
# Run: Rscript make_reference_boundary.R (R 4.2.2, lme4 1.1-31).
suppressMessages(library(lme4))
d <- read.csv("rank_one_boundary.csv")
f <- lmer(y ~ x + (x | g), d, REML = FALSE)
cat(sprintf("logLik %.8f\n", logLik(f)))
print(as.data.frame(VarCorr(f)), digits = 10)
print(fixef(f), digits = 10)
print(sqrt(diag(vcov(f))), digits = 10)
cat("isSingular", isSingular(f), "\n")
