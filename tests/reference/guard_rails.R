# lme4's guard rails: the decisions and numbers tests/test_guard_rails.py asserts.
# lme4 1.1-31 (R 4.2.2). Run: Rscript tests/reference/guard_rails.R
suppressMessages(library(lme4))
options(digits = 10, warn = 1)
show <- function(label, expr) {
  cat("---", label, "\n")
  r <- tryCatch(withCallingHandlers(expr,
         warning = function(w) { cat("warning:", conditionMessage(w), "\n"); invokeRestart("muffleWarning") },
         message = function(m) { cat("message:", conditionMessage(m)); invokeRestart("muffleMessage") }),
       error = function(e) cat("error:", conditionMessage(e), "\n"))
  if (!is.null(r)) print(r)
}
str(lmerControl()$checkControl)
str(glmerControl()$checkControl)

ss <- sleepstudy
ss$Days2 <- 2 * ss$Days

# 1. A rank-deficient fixed design: the aliased (later) column is dropped.
show("Days + Days2 (ML)", {
  f <- lmer(Reaction ~ Days + Days2 + (Days | Subject), ss, REML = FALSE)
  list(fixef = fixef(f), vcov = as.matrix(vcov(f)), logLik = logLik(f))
})
show("Days (ML)", {
  f <- lmer(Reaction ~ Days + (Days | Subject), ss, REML = FALSE)
  list(fixef = fixef(f), vcov = as.matrix(vcov(f)), logLik = logLik(f))
})
show("Days2 + Days (ML): Days2 is kept", fixef(lmer(Reaction ~ Days2 + Days + (Days | Subject), ss, REML = FALSE)))

# 2. lme4's checks of the grouping factors and the random effects.
show("(1 | Subject/Days)", lmer(Reaction ~ Days + (1 | Subject/Days), ss))
ss$one <- "a"
show("a single level", lmer(Reaction ~ Days + (1 | one), ss))
s36 <- subset(ss, Days %in% c(0, 1))
show("36 rows, 54 random effects", lmer(Reaction ~ Days + (1 + Days + I(Days^2) | Subject), s36))
show("36 rows, 36 random effects", lmer(Reaction ~ Days + (Days | Subject), s36))
# glmer allows as many levels (and random effects) as observations.
cbpp$obs <- factor(seq_len(nrow(cbpp)))
show("cbpp, observation-level random effect",
     fixef(glmer(cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs), cbpp, family = binomial)))
i <- 0:35
b <- data.frame(y = rep(c(0, 1, 1, 0, 1, 0), 6), x = i %% 6 + 1, g = factor(i %/% 3 + 1), obs = factor(i + 1))
show("binary, 36 levels for 36 rows", fixef(glmer(y ~ x + (1 | g) + (1 | obs), b, family = binomial)))
show("binary, 36 random effects for 36 rows: no check error",
     class(glmer(y ~ x + (1 + x + I(x^2) | g), b, family = binomial)))
show("binary, 48 random effects for 36 rows",
     glmer(y ~ x + (1 + x + I(x^2) + I(x^3) | g), b, family = binomial))

# 3. Unused levels are dropped (model.frame(drop.unused.levels = TRUE)).
ss$f <- factor(ifelse(ss$Days < 5, "early", "late"), levels = c("early", "late", "never"))
show("an unused level in the fixed part", fixef(lmer(Reaction ~ f + (1 | Subject), ss, REML = FALSE)))
ss3 <- sleepstudy
ss3$Subject <- factor(ss3$Subject, levels = c(levels(ss3$Subject), "999"))
show("an unused level of the grouping factor", {
  f <- lmer(Reaction ~ Days + (1 | Subject), ss3, REML = FALSE)
  list(ngrps = ngrps(f), fixef = fixef(f))
})

# 4. Separation: lme4 does not detect it; its estimates are huge with huge SEs.
i <- 0:47
d <- data.frame(g = factor(i %/% 6 + 1), x = (i %% 6) - 2.5, f = factor(ifelse(i %% 3 == 0, "b", "a")))
d$y <- ifelse(d$f == "b", 1, as.integer((i * 7) %% 5 < 2))
d$y2 <- as.integer(d$x > 0)
show("quasi-complete separation (every row of f = b a success)", coef(summary(glmer(y ~ x + f + (1 | g), d, family = binomial))))
show("complete separation on x", coef(summary(glmer(y2 ~ x + (1 | g), d, family = binomial))))
show("not separated", coef(summary(glmer(y ~ x + (1 | g), d, family = binomial))))

# 5. The response on both sides: model.matrix drops it.
show("Reaction ~ Reaction + Days", fixef(lmer(Reaction ~ Reaction + Days + (1 | Subject), ss, REML = FALSE)))
show("Reaction ~ Days", fixef(lmer(Reaction ~ Days + (1 | Subject), ss, REML = FALSE)))
show("Reaction ~ Reaction * Days: the interaction stays",
     colnames(suppressWarnings(model.matrix(Reaction ~ Reaction * Days, ss))))

# 6. A constant response: glmer stops; lmer ends at a residual sd of ~1e-17.
ss$const <- 5
show("gaussian, constant", {
  f <- lmer(const ~ Days + (1 | Subject), ss)
  list(fixef = fixef(f), sigma = sigma(f))
})
ss$b1 <- 1
show("binomial, constant", glmer(b1 ~ Days + (1 | Subject), ss, family = binomial))
