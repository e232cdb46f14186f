// Tolerance checks shared by the emulated kernel tests: print every figure, remember any failure,
// exit non-zero at the end (tests/kernels_emulated.rs reads the exit status).
#pragma once
#include <cmath>
#include <cstdio>
#include <vector>

inline int emulated_failures = 0;

// max |got - want| / max |want|; NaN anywhere fails.
inline double rel_max_err(const std::vector<double>& got, const std::vector<double>& want) {
    double e = 0, m = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::isnan(got[i])) return INFINITY;
        e = std::fmax(e, std::fabs(got[i] - want[i]));
        m = std::fmax(m, std::fabs(want[i]));
    }
    return e / (m > 0 ? m : 1);
}

inline void expect_below(const char* what, double err, double tol) {
    const bool ok = err < tol;  // false for NaN
    std::printf("%-48s %.3e  (tolerance %.0e)%s\n", what, err, tol, ok ? "" : "  FAILED");
    if (!ok) ++emulated_failures;
}

inline std::vector<double> widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }
