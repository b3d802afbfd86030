//! Micro-benchmarks of what the orchestrator does per event and per call, without I/O:
//!
//! - `engine`: the state machine over the 3-step order-placement plan: one step
//!   (`Saga::next` deciding the next event, then `Saga::apply` folding it in, as the driver
//!   does), `next` and `apply` alone, `on_result`, and a whole saga from `saga_started` to
//!   `saga_completed` (8 events, with the business status after each, as the runtime
//!   records them).
//! - `event`: serde_json encoding and decoding of `saga_engine::Event`, as the store writes
//!   and reads them (the first event, with the input; a result, with its output; an intent;
//!   and the whole 8-event log).
//! - `mapping`: `template::render` of the `submit_order` request mapping against a saga
//!   context, and with the context built first (as each call does).
//!
//! `cargo bench -p bench --bench engine`

use std::hint::black_box;
use std::time::Duration;

use bench::history::{Finished, order_placement, run_to_end};
use bench::load::order_input;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use saga_engine::{Event, Next, Plan, Saga, template};
use serde_json::{Value, json};

fn plan() -> Plan {
    order_placement(&bench::default_sagas_dir()).expect("order-placement compiles")
}

fn output() -> Value {
    json!({"authorization_id": "auth-0192f4c1", "store_order_id": "so-0192f4c1", "delivery_id": "d-1"})
}

/// A saga just started, and the log of one that ran to its end.
fn fixtures(plan: &Plan) -> (Saga, Finished) {
    let finished = run_to_end(
        plan,
        "0192f4c1-7a3e-7cc2-9d1e-5b2f3a4c5d6e",
        order_input("o-42", false),
        &output(),
    )
    .expect("a saga runs to its end");
    let started = Saga::from_events(plan, &finished.events[..1]).expect("replays");
    (started, finished)
}

fn engine(c: &mut Criterion) {
    let plan = plan();
    let (started, finished) = fixtures(&plan);
    let Next::Record(intent) = started.next(&plan, 2_000) else {
        panic!("a started saga records its first intent");
    };
    let mut running = started.clone();
    running.apply(&plan, &intent).expect("applies");
    let Next::Wait(wait) = running.next(&plan, 2_001) else {
        panic!("an intent is followed by a wait for its call");
    };
    let call = wait.calls.first().expect("one call").clone();

    let mut group = c.benchmark_group("engine");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("step (next + apply)", |b| {
        b.iter_batched(
            || started.clone(),
            |mut saga| {
                if let Next::Record(event) = saga.next(&plan, black_box(2_000)) {
                    saga.apply(&plan, &event).expect("applies");
                }
                saga
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("next", |b| {
        b.iter(|| black_box(started.next(&plan, black_box(2_000))));
    });
    group.bench_function("apply", |b| {
        b.iter_batched(
            || started.clone(),
            |mut saga| {
                saga.apply(&plan, black_box(&intent)).expect("applies");
                saga
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("on_result", |b| {
        let result = output();
        b.iter(|| {
            black_box(
                running
                    .on_result(&plan, &call, Ok(result.clone()), 2_002, 0.5)
                    .expect("in flight"),
            )
        });
    });
    group.bench_function("whole saga (8 events)", |b| {
        let result = output();
        b.iter(|| {
            black_box(run_to_end(&plan, "s-1", order_input("o-42", false), &result).expect("runs"))
        });
    });
    group.bench_function("replay (from_events, 8 events)", |b| {
        b.iter(|| black_box(Saga::from_events(&plan, &finished.events).expect("replays")));
    });
    group.finish();
}

fn event(c: &mut Criterion) {
    let plan = plan();
    let (_, finished) = fixtures(&plan);
    let first = finished.events[0].clone();
    let intent = finished.events[1].clone();
    let result = finished.events[2].clone();
    let encode = |e: &Event| serde_json::to_vec(e).expect("encodes");

    let mut group = c.benchmark_group("event");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(1));
    for (name, event) in [
        ("saga_started", &first),
        ("step_started", &intent),
        ("step_succeeded", &result),
    ] {
        let bytes = encode(event);
        group.bench_function(format!("encode {name} ({} B)", bytes.len()), |b| {
            b.iter(|| black_box(encode(black_box(event))));
        });
        group.bench_function(format!("decode {name} ({} B)", bytes.len()), |b| {
            b.iter(|| {
                black_box(serde_json::from_slice::<Event>(black_box(&bytes)).expect("decodes"))
            });
        });
    }
    let log: Vec<Vec<u8>> = finished.events.iter().map(encode).collect();
    group.bench_function("encode whole log (8 events)", |b| {
        b.iter(|| black_box(finished.events.iter().map(encode).collect::<Vec<_>>()));
    });
    group.bench_function("decode whole log (8 events)", |b| {
        b.iter(|| {
            black_box(
                log.iter()
                    .map(|bytes| serde_json::from_slice::<Event>(bytes).expect("decodes"))
                    .collect::<Vec<_>>(),
            )
        });
    });
    group.finish();
}

fn mapping(c: &mut Criterion) {
    let plan = plan();
    let (_, finished) = fixtures(&plan);
    // The saga after authorize_payment succeeded: the context has its output.
    let saga = Saga::from_events(&plan, &finished.events[..3]).expect("replays");
    let submit = plan
        .steps
        .iter()
        .find(|s| s.name == "submit_order")
        .and_then(|s| s.call())
        .expect("submit_order calls the store");
    let void = plan.steps[0]
        .call()
        .and_then(|c| c.compensation.as_ref())
        .expect("authorize_payment has a compensation");
    let context = saga.context(&plan);

    let mut group = c.benchmark_group("mapping");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("render submit_order request", |b| {
        b.iter(|| {
            black_box(template::render(
                &submit.action.request,
                black_box(&context),
            ))
        });
    });
    group.bench_function("render void_charge request (step output)", |b| {
        b.iter(|| black_box(template::render(&void.request, black_box(&context))));
    });
    group.bench_function("context + render (per call)", |b| {
        b.iter(|| {
            black_box(template::render(
                &submit.action.request,
                &saga.context(&plan),
            ))
        });
    });
    group.finish();
}

criterion_group!(benches, engine, event, mapping);
criterion_main!(benches);
