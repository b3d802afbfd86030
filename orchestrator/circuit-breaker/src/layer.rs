//! [`CircuitBreakerLayer`]: wraps services in a [`CircuitBreakerService`] sharing one breaker.

use tower::Layer;

use crate::breaker::CircuitBreaker;
use crate::classify::Classify;
use crate::service::CircuitBreakerService;

/// Puts a [`CircuitBreaker`] in front of a service. Every service this layer wraps (and
/// every clone of them) shares the one breaker. Made by [`CircuitBreaker::layer`].
#[derive(Debug)]
pub struct CircuitBreakerLayer<C> {
    breaker: CircuitBreaker,
    classifier: C,
}

impl<C: Clone> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    pub fn new(breaker: CircuitBreaker, classifier: C) -> Self {
        Self {
            breaker,
            classifier,
        }
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C: Classify> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, self.breaker.clone(), self.classifier.clone())
    }
}
