# glmmTMB reference fits for the families lme4 does not have (beta, zero-inflated Poisson and
# negative binomial) and for the gamma family under both links (lme4's default is inverse).
# Step 1 writes each data set from its R package to ../data/<name>.csv (write.csv, no row names,
# factor labels as strings, helper columns precomputed); step 2 reads the CSV files back and fits
# every case by maximum likelihood (glmmTMB's Laplace approximation), so the numbers describe
# exactly what is in the CSV files. Output: glmmtmb_reference.json beside this script.
# Needs R with glmmTMB, jsonlite, lme4, MASS, pscl (Debian: r-cran-glmmtmb r-cran-jsonlite
# r-cran-lme4 r-cran-mass r-cran-pscl). Run from this folder:
#   Rscript make_reference_glmmtmb.R
suppressMessages({library(glmmTMB); library(jsonlite)})
data_dir <- file.path("..", "data")
dir.create(data_dir, showWarnings = FALSE)

## ---------------------------------------------------------------- step 1: data
export <- function(d, name) {
  d <- as.data.frame(d)
  for (c in names(d)) if (is.factor(d[[c]])) d[[c]] <- as.character(d[[c]])
  write.csv(d, file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}
if (!identical(Sys.getenv("SKIP_EXPORT"), "1")) {
  export(glmmTMB::Salamanders, "salamanders")
  export(glmmTMB::Owls, "owls")
  uk <- pscl::UKHouseOfCommons
  uk$county[uk$county == ""] <- "(blank)"          # two constituencies have no name or county:
  uk$constituency[uk$constituency == ""] <- "(blank)"  # R kept "" as a level, pandas reads NaN
  export(uk, "ukhoc")
  si <- MASS::Sitka
  si$tree <- paste0("T", si$tree)            # a grouping factor, not a number
  si$t <- (si$Time - 200) / 100              # days since 200, in hundreds
  si$w <- si$Time / 200                      # synthetic positive weights (see the case's notes)
  export(si, "sitka")
  export(lme4::sleepstudy, "sleepstudy_gamma")
}

## ---------------------------------------------------------------- step 2: fits
read <- function(name, factors) {
  d <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (f in factors) d[[f]] <- factor(d[[f]], levels = sort(unique(d[[f]])))
  d
}

# The family's own parameter as keras_glmm names it, from glmmTMB's sigma():
# nbinom2 theta (sigma = theta), beta phi (sigma = phi), Gamma shape = 1 / sigma^2 (sigma = CV).
dispersion_of <- function(family, fit) {
  s <- sigma(fit)
  switch(family,
    zero_inflated_poisson = setNames(list(), character(0)),  # {} in JSON
    zero_inflated_negative_binomial = list(dispersion = s),
    beta = list(precision = s),
    gamma = list(shape = 1 / s^2))
}

out <- list()
record <- function(case, data, factors, formula_r, formula, family, glmmtmb_family, link,
                   ziformula = ~0, weights = NULL, response_scale = 1, notes = NULL) {
  d <- read(data, factors)
  if (response_scale != 1) {
    # Fit y / c, well scaled for the optimizer, and report the model of y: the gamma family
    # with the inverse link is closed under scaling (beta and the sds divide by c, the shape
    # is unchanged, the log-likelihood drops by n log c).
    stopifnot(family == "gamma", link == "inverse")
    response <- all.vars(as.formula(formula_r))[1]
    d[[response]] <- d[[response]] / response_scale
  }
  msgs <- character()
  t <- withCallingHandlers(system.time(fit <- if (is.null(weights)) {
      glmmTMB(as.formula(formula_r), data = d, family = glmmtmb_family, ziformula = ziformula, REML = FALSE)
    } else {
      d$.w <- d[[weights]]
      glmmTMB(as.formula(formula_r), data = d, family = glmmtmb_family, ziformula = ziformula, REML = FALSE,
              weights = .w)
    }),
    warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
    message = function(m) { msgs <<- c(msgs, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
  c <- response_scale
  cond <- fixef(fit)$cond / c
  v <- vcov(fit)$cond / c^2
  vc <- VarCorr(fit)$cond
  sds <- list()
  for (g in names(vc)) {
    s <- attr(vc[[g]], "stddev") / c
    for (k in names(s)) sds[[length(sds) + 1]] <- list(grp = g, var1 = k, var2 = NA, sdcor = unname(s[[k]]))
    r <- attr(vc[[g]], "correlation")
    if (length(s) > 1) for (j in 1:(length(s) - 1)) for (k in (j + 1):length(s))
      sds[[length(sds) + 1]] <- list(grp = g, var1 = names(s)[j], var2 = names(s)[k], sdcor = r[j, k])
  }
  e <- list(
    data = paste0(data, ".csv"), formula_r = formula_r, formula = formula,
    ziformula = paste(deparse(ziformula), collapse = ""), family = family,
    family_glmmtmb = glmmtmb_family$family, link = link, weights = weights,
    engine = "glmmTMB", reml = FALSE,
    fixef = as.list(cond), se = as.list(sqrt(diag(v))), varcorr = sds,
    sigma = sigma(fit), dispersion = dispersion_of(family, fit),
    logLik = as.numeric(logLik(fit)) - nobs(fit) * log(c), nobs = nobs(fit), fit_seconds = t[["elapsed"]],
    pdHess = fit$sdr$pdHess)
  if (length(fixef(fit)$zi)) {
    zi <- fixef(fit)$zi
    zi_se <- unname(sqrt(diag(vcov(fit)$zi)))
    e$zi_intercept <- unname(zi[["(Intercept)"]])
    e$zi_se <- zi_se[1]
    if (length(zi) == 1) {
      e$dispersion$zi_odds <- exp(e$zi_intercept)   # pi / (1 - pi), pi = plogis(zi intercept)
    }
    # Every zero-inflation coefficient (logit scale) and its standard error, by name.
    e$zi_fixef <- as.list(zi)
    e$zi_fixef_se <- setNames(as.list(zi_se), names(zi))
  }
  if (length(msgs)) notes <- c(notes, paste0("glmmTMB said: ", paste(unique(msgs), collapse = " | ")))
  if (!is.null(notes)) e$notes <- paste(notes, collapse = " ")
  out[[case]] <<- e
}

record("salamanders_zip", "salamanders", c("site", "spp", "mined"),
  "count ~ spp + mined + (1|site)", "count ~ spp + mined + (1|site)",
  "zero_inflated_poisson", poisson(), "log", ziformula = ~1,
  notes = "glmmTMB::Salamanders (salamander counts, 23 sites, 7 species/stages); a constant zero-inflation probability. Python's spp levels sort alphabetically like R's here (factor levels sorted in both).")
record("salamanders_zinb", "salamanders", c("site", "spp", "mined"),
  "count ~ spp + mined + (1|site)", "count ~ spp + mined + (1|site)",
  "zero_inflated_negative_binomial", nbinom2(), "log", ziformula = ~1,
  notes = "As salamanders_zip with an NB2 count component (glmmTMB nbinom2: variance mu + mu^2 / theta).")
record("salamanders_zip_zimined", "salamanders", c("site", "spp", "mined"),
  "count ~ spp + mined + (1|site)", "count ~ spp + mined + (1|site)",
  "zero_inflated_poisson", poisson(), "log", ziformula = ~mined,
  notes = "As salamanders_zip with a zero-inflation probability that depends on mining (ziformula = ~mined): logit(pi) = zi intercept + zi minedyes.")
record("salamanders_zip_zispp", "salamanders", c("site", "spp", "mined"),
  "count ~ spp + mined + (1|site)", "count ~ spp + mined + (1|site)",
  "zero_inflated_poisson", poisson(), "log", ziformula = ~spp,
  notes = "As salamanders_zip with a zero-inflation probability per species/stage (ziformula = ~spp, seven zi coefficients, treatment contrasts).")
record("salamanders_zinb_zimined", "salamanders", c("site", "spp", "mined"),
  "count ~ spp + mined + (1|site)", "count ~ spp + mined + (1|site)",
  "zero_inflated_negative_binomial", nbinom2(), "log", ziformula = ~mined,
  notes = "As salamanders_zinb with ziformula = ~mined: the zi coefficients are weakly identified (standard errors about 3 on the logit scale), the NB2 overdispersion explaining most zeros.")
record("owls_zinb", "owls", c("Nest", "FoodTreatment", "SexParent"),
  "SiblingNegotiation ~ FoodTreatment + ArrivalTime + SexParent + offset(logBroodSize) + (1|Nest)",
  "SiblingNegotiation ~ FoodTreatment + ArrivalTime + SexParent + offset(logBroodSize) + (1|Nest)",
  "zero_inflated_negative_binomial", nbinom2(), "log", ziformula = ~1,
  notes = "glmmTMB::Owls (barn owl nestling calls, 27 nests), with an offset; the glmmTMB paper's model with a constant zero-inflation.")
record("ukhoc_beta", "ukhoc", c("county"),
  "v3 ~ libinc + y1lag + y2lag + (1|county)", "v3 ~ libinc + y1lag + y2lag + (1|county)",
  "beta", beta_family(link = "logit"), "logit",
  notes = "pscl::UKHouseOfCommons (1997 UK general election, 521 English constituencies in 81 counties): v3 is the Liberal Democrat vote share, y1lag and y2lag the 1992 log-ratios Conservative/LD and Labour/LD, libinc a LD incumbent. Two rows with a blank county form the county \"(blank)\".")
record("sitka_gamma_log", "sitka", c("tree", "treat"),
  "size ~ treat + t + I(t^2) + (1|tree)", "size ~ treat + t + I(t**2) + (1|tree)",
  "gamma", Gamma(link = "log"), "log",
  notes = "MASS::Sitka (log-size of 79 Sitka spruces, 5 times each, ozone vs control); t = (Time - 200) / 100.")
record("sitka_gamma_inverse", "sitka", c("tree", "treat"),
  "size ~ treat + t + I(t^2) + (1|tree)", "size ~ treat + t + I(t**2) + (1|tree)",
  "gamma", Gamma(link = "inverse"), "inverse",
  notes = "As sitka_gamma_log under the inverse link (lme4's and R's default for Gamma).")
record("sitka_gamma_log_weighted", "sitka", c("tree", "treat"),
  "size ~ treat + t + I(t^2) + (1|tree)", "size ~ treat + t + I(t**2) + (1|tree)",
  "gamma", Gamma(link = "log"), "log", weights = "w",
  notes = "As sitka_gamma_log with prior weights w = Time / 200 (synthetic, 0.76 to 1.29): glmmTMB multiplies each row's log-likelihood by its weight, as keras_glmm does for non-gaussian families.")
record("sleepstudy_gamma_inverse", "sleepstudy_gamma", c("Subject"),
  "Reaction ~ Days + (1|Subject)", "Reaction ~ Days + (1|Subject)",
  "gamma", Gamma(link = "inverse"), "inverse", response_scale = 1000,
  notes = c("lme4::sleepstudy under the gamma family with the inverse link: eta is about 0.004 and the subject sd about 5e-4 on that scale.",
            "Fitted as Reaction / 1000 and reported for Reaction (see response_scale in the script): from its default start (eta = 0, outside the inverse link's domain) glmmTMB stops at a wrong point on the raw scale; started at the GLM it reaches the same optimum."))
record("sleepstudy_gamma_inverse_slope", "sleepstudy_gamma", c("Subject"),
  "Reaction ~ Days + (Days|Subject)", "Reaction ~ Days + (Days|Subject)",
  "gamma", Gamma(link = "inverse"), "inverse", response_scale = 1000,
  notes = "As sleepstudy_gamma_inverse with a correlated random slope on Days (fitted as Reaction / 1000: on the raw scale glmmTMB's Hessian is not positive definite).")

out[["_about"]] <- list(
  R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
  TMB = as.character(packageVersion("TMB")),
  method = "maximum likelihood, glmmTMB's Laplace approximation (REML = FALSE)",
  dispersion = "sigma is glmmTMB's sigma(fit); dispersion holds keras_glmm's parameters: beta precision = phi = sigma; negative binomial dispersion = theta = sigma; gamma shape = 1 / sigma^2 (glmmTMB's sigma is the coefficient of variation); zi_odds = exp(zi intercept) = pi / (1 - pi) for a constant zero-inflation (ziformula = ~1).",
  zero_inflation = "zi_fixef and zi_fixef_se: glmmTMB's fixef(fit)$zi and the square roots of diag(vcov(fit)$zi), by coefficient name (logit of the zero-inflation probability); zi_intercept and zi_se are the intercept's.",
  fixef_order = "design-column order, identical to formulaic's for these formulas")
write(toJSON(out, auto_unbox = TRUE, digits = I(11), pretty = TRUE, null = "null", na = "null"),
      "glmmtmb_reference.json")
