//! A future for a write that resolves once the write is durable.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::{Result, StoreError};

/// Resolves to the write's result once it is durable (or failed).
#[derive(Debug)]
pub struct Pending<T> {
    inner: PendingInner<T>,
}

#[derive(Debug)]
enum PendingInner<T> {
    Waiting(oneshot::Receiver<Result<T>>),
    Ready(Option<Result<T>>),
}

impl<T> Pending<T> {
    pub(crate) fn waiting(receiver: oneshot::Receiver<Result<T>>) -> Self {
        Pending {
            inner: PendingInner::Waiting(receiver),
        }
    }

    /// A write that failed before it was queued.
    pub fn failed(error: StoreError) -> Self {
        Pending {
            inner: PendingInner::Ready(Some(Err(error))),
        }
    }
}

impl<T: Unpin> Future for Pending<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().inner {
            PendingInner::Waiting(receiver) => match Pin::new(receiver).poll(cx) {
                Poll::Ready(Ok(result)) => Poll::Ready(result),
                Poll::Ready(Err(_)) => Poll::Ready(Err(StoreError::Closed)),
                Poll::Pending => Poll::Pending,
            },
            PendingInner::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(StoreError::Closed)))
            }
        }
    }
}
