//! [`CircuitBreakerLayer`]: wraps services in a [`CircuitBreakerService`] sharing one breaker.

use std::sync::Arc;

use tower::Layer;

use crate::breaker::CircuitBreaker;
use crate::classify::Classify;
use crate::service::CircuitBreakerService;

/// Puts a [`CircuitBreaker`] in front of a service. Every service this layer wraps (and
/// every clone of them) shares the one breaker. Made by [`CircuitBreaker::layer`].
#[derive(Debug)]
pub struct CircuitBreakerLayer<C> {
    breaker: CircuitBreaker,
    classifier: Arc<C>,
}

impl<C> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            classifier: Arc::clone(&self.classifier),
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    pub fn new(breaker: CircuitBreaker, classifier: C) -> Self {
        Self {
            breaker,
            classifier: Arc::new(classifier),
        }
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, C: Classify> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::with_shared_classifier(
            inner,
            self.breaker.clone(),
            Arc::clone(&self.classifier),
        )
    }
}
