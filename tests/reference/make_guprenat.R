# guPrenat (mlmRev): prenatal care in Guatemala, 2,449 births of 1,558 mothers in
# 161 communities (Rodriguez & Goldman 1995, 2001). Writes the bundled CSV
# keras_glmm/datasets/data/guprenat.csv.gz (factor labels as strings, R's column
# order) and times lme4's Laplace fit of the nested model of
# tests/test_quadrature_accuracy.py on this machine.
#
# Run from the repository root: Rscript tests/reference/make_guprenat.R
suppressMessages(library(mlmRev))
d <- guPrenat
out <- gzfile("keras_glmm/datasets/data/guprenat.csv.gz", "w")
write.csv(data.frame(lapply(d, function(col) if (is.factor(col)) as.character(col) else col)),
          out, row.names = FALSE)
close(out)
cat("rows", nrow(d), "mothers", nlevels(d$mom), "communities", nlevels(d$cluster), "\n")
form <- prenat ~ childAge + motherAge + indig + momEd + husEd + husEmpl + toilet + pcInd81 + ssDist +
  (1 | cluster/mom)
seconds <- system.time(fit <- glmer(form, d, family = binomial))[["elapsed"]]
cat("glmer Laplace seconds", seconds, "logLik", as.numeric(logLik(fit)), "\n")
print(VarCorr(fit))
print(fixef(fit))
