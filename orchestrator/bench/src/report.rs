//! What one scenario measured, printed as a row of the table and as one JSON line.

use std::fmt::Write as _;

use serde_json::Value;

use crate::load::Percentiles;

/// The figures of one scenario (see BENCHMARKS.md for what each means).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub sagas: usize,
    pub concurrency: usize,
    pub completed: usize,
    pub compensated: usize,
    pub errors: usize,
    pub wall_s: f64,
    pub sagas_per_s: f64,
    /// End-to-end latency; `None` where a scenario has no per-saga latency (restart).
    pub latency: Option<Percentiles>,
    pub orchestrator_cpu_ms_per_saga: f64,
    pub participants_cpu_ms_per_saga: f64,
    pub flushes_per_saga: f64,
    pub orchestrator_peak_rss_mb: f64,
    /// Scenario-specific keys, appended to the JSON line (e.g. `resume_s`).
    pub extra: Vec<(&'static str, Value)>,
    /// Lines printed under the table (details that are not part of the JSON).
    pub notes: Vec<String>,
}

/// `x` rounded to `places` decimals, as JSON (`null` if not finite).
pub fn number(x: f64, places: i32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let scale = 10f64.powi(places);
    serde_json::Number::from_f64((x * scale).round() / scale).map_or(Value::Null, Value::Number)
}

impl Report {
    /// The keys in their documented order, then the scenario's own.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let latency = |pick: fn(&Percentiles) -> f64| {
            self.latency
                .as_ref()
                .map_or(Value::Null, |p| number(pick(p), 2))
        };
        let mut fields = vec![
            ("scenario", Value::from(self.scenario.clone())),
            ("sagas", Value::from(self.sagas)),
            ("concurrency", Value::from(self.concurrency)),
            ("completed", Value::from(self.completed)),
            ("compensated", Value::from(self.compensated)),
            ("errors", Value::from(self.errors)),
            ("wall_s", number(self.wall_s, 3)),
            ("sagas_per_s", number(self.sagas_per_s, 1)),
            ("p50_ms", latency(|p| p.p50)),
            ("p90_ms", latency(|p| p.p90)),
            ("p99_ms", latency(|p| p.p99)),
            ("max_ms", latency(|p| p.max)),
            (
                "orchestrator_cpu_ms_per_saga",
                number(self.orchestrator_cpu_ms_per_saga, 3),
            ),
            (
                "participants_cpu_ms_per_saga",
                number(self.participants_cpu_ms_per_saga, 3),
            ),
            ("flushes_per_saga", number(self.flushes_per_saga, 3)),
            (
                "orchestrator_peak_rss_mb",
                number(self.orchestrator_peak_rss_mb, 1),
            ),
        ];
        fields.extend(self.extra.iter().cloned());
        fields
    }

    /// One JSON object on one line, keys in [`Report::fields`] order.
    pub fn json_line(&self) -> String {
        let body: Vec<String> = self
            .fields()
            .into_iter()
            .map(|(key, value)| format!("{}:{value}", Value::from(key)))
            .collect();
        format!("{{{}}}", body.join(","))
    }
}

/// The table of every report, with their notes under it.
pub fn table(reports: &[Report]) -> String {
    let header = [
        "scenario",
        "sagas",
        "conc",
        "ok",
        "comp",
        "err",
        "wall_s",
        "sagas/s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "orch_cpu_ms",
        "part_cpu_ms",
        "flush/saga",
        "orch_rss_mb",
        "extra",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let ms = |pick: fn(&Percentiles) -> f64| {
                r.latency
                    .as_ref()
                    .map_or("-".to_owned(), |p| format!("{:.1}", pick(p)))
            };
            let extra: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                r.scenario.clone(),
                r.sagas.to_string(),
                r.concurrency.to_string(),
                r.completed.to_string(),
                r.compensated.to_string(),
                r.errors.to_string(),
                format!("{:.2}", r.wall_s),
                format!("{:.0}", r.sagas_per_s),
                ms(|p| p.p50),
                ms(|p| p.p90),
                ms(|p| p.p99),
                ms(|p| p.max),
                format!("{:.3}", r.orchestrator_cpu_ms_per_saga),
                format!("{:.3}", r.participants_cpu_ms_per_saga),
                format!("{:.2}", r.flushes_per_saga),
                format!("{:.1}", r.orchestrator_peak_rss_mb),
                extra.join(" "),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            // The scenario and the extras are text: left-aligned; numbers right-aligned.
            if i == 0 || i == cells.len() - 1 {
                let _ = write!(text, "{cell:<width$}  ");
            } else {
                let _ = write!(text, "{cell:>width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_owned));
    for row in &rows {
        line(row);
    }
    for r in reports {
        for note in &r.notes {
            let _ = writeln!(out, "  {}: {note}", r.scenario);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            scenario: "c64".into(),
            sagas: 5000,
            concurrency: 64,
            completed: 5000,
            wall_s: 2.5,
            sagas_per_s: 2000.0,
            latency: Some(Percentiles {
                p50: 10.0,
                p90: 20.0,
                p99: 30.456,
                max: 40.0,
            }),
            orchestrator_cpu_ms_per_saga: 0.4,
            ..Report::default()
        }
    }

    #[test]
    fn the_json_line_has_exactly_the_documented_keys_in_order() {
        let line = report().json_line();
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["p99_ms"], 30.46);
        assert_eq!(value["sagas_per_s"], 2000.0);
        let keys: Vec<&str> = report().fields().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "scenario",
                "sagas",
                "concurrency",
                "completed",
                "compensated",
                "errors",
                "wall_s",
                "sagas_per_s",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "max_ms",
                "orchestrator_cpu_ms_per_saga",
                "participants_cpu_ms_per_saga",
                "flushes_per_saga",
                "orchestrator_peak_rss_mb",
            ]
        );
        // In that order on the line too.
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| line.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn extras_follow_and_missing_latency_is_null() {
        let mut r = report();
        r.latency = None;
        r.extra.push(("resume_s", number(0.1234, 3)));
        let value: Value = serde_json::from_str(&r.json_line()).unwrap();
        assert_eq!(value["p50_ms"], Value::Null);
        assert_eq!(value["resume_s"], 0.123);
        assert!(r.json_line().ends_with("\"resume_s\":0.123}"));
        assert_eq!(number(f64::NAN, 2), Value::Null);
    }

    #[test]
    fn the_table_has_a_row_per_report_and_the_notes() {
        let mut r = report();
        r.notes.push("load generator used 1 s of CPU".into());
        let text = table(&[r.clone(), r]);
        assert_eq!(text.lines().count(), 1 + 2 + 2);
        assert!(text.lines().next().unwrap().starts_with("scenario"));
        assert!(text.contains("  c64: load generator"));
    }
}
