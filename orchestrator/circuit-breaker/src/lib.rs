//! A circuit breaker as a generic tower Layer (under construction).
