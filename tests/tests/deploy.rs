//! `deploy/` checked against the code (no Docker engine or cluster runs here): every
//! command in the Dockerfile, the compose file and the Kubernetes manifests parses with the
//! real command line of a binary the Dockerfile builds; listen ports are the defaults; probe
//! paths exist on the admin server; Prometheus scrapes every admin port; the definitions
//! ConfigMap covers every file of `sagas/`; grace periods cover the orchestrator's drain.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

fn strings(value: &Value) -> anyhow::Result<Vec<String>> {
    value
        .as_array()
        .context("not a list")?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .context("not a string in the list")
        })
        .collect()
}

/// What a command line starts: which binary, its service, and its addresses.
#[derive(Debug, PartialEq)]
struct Launch {
    binary: String,
    /// `orchestrator`, `payment`, `store`, `rider`, `notifier`, or `healthcheck`.
    service: String,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    /// For healthchecks: the URL probed.
    url: Option<String>,
    /// The orchestrator's drain, if it is one.
    shutdown_grace: Option<Duration>,
    /// The orchestrator's `--participant` endpoints.
    participants: Vec<(String, String)>,
}

/// Parses `argv` with the real command line of its binary; fails on any unknown flag.
fn launch(argv: &[String]) -> anyhow::Result<Launch> {
    let binary = argv.first().context("an empty command")?.clone();
    match binary.as_str() {
        "orchestrator" => {
            use orchestrator::cli::orchestrator::{Cli, Command};
            let cli = Cli::try_parse_from(argv).with_context(|| format!("{argv:?}"))?;
            Ok(match cli.command {
                Command::Serve(args) => Launch {
                    binary,
                    service: "orchestrator".into(),
                    listen: Some(args.common.listen),
                    admin: args.common.admin_listen.0,
                    url: None,
                    shutdown_grace: Some(args.common.shutdown_grace),
                    participants: args.participants,
                },
                Command::Healthcheck(args) => Launch {
                    binary,
                    service: "healthcheck".into(),
                    listen: None,
                    admin: None,
                    url: Some(args.url),
                    shutdown_grace: None,
                    participants: Vec::new(),
                },
                other => bail!("{argv:?} runs {other:?}, not a deployable command"),
            })
        }
        "participant" => {
            use participants::cli::{AdminListen, Cli, Command};
            let cli = Cli::try_parse_from(argv).with_context(|| format!("{argv:?}"))?;
            let service = match &cli.command {
                Command::Payment => "payment",
                Command::Store => "store",
                Command::Rider => "rider",
                Command::Notifier(_) => "notifier",
                Command::Healthcheck(_) => "healthcheck",
            };
            let url = match &cli.command {
                Command::Healthcheck(args) => Some(args.url.clone()),
                _ => None,
            };
            Ok(Launch {
                binary,
                service: service.into(),
                listen: cli.listen,
                admin: match cli.admin_listen {
                    Some(AdminListen::At(addr)) => Some(addr),
                    _ => None,
                },
                url,
                shutdown_grace: None,
                participants: Vec::new(),
            })
        }
        "sagactl" => {
            orchestrator::cli::sagactl::Cli::try_parse_from(argv)
                .map(|_| ())
                .or_else(|e| match e.kind() {
                    clap::error::ErrorKind::DisplayHelp => Ok(()),
                    _ => Err(e),
                })
                .with_context(|| format!("{argv:?}"))?;
            Ok(Launch {
                binary,
                service: "sagactl".into(),
                listen: None,
                admin: None,
                url: None,
                shutdown_grace: None,
                participants: Vec::new(),
            })
        }
        other => bail!("`{other}` is not a binary of this workspace"),
    }
}

/// The default gRPC and admin ports of each service.
fn default_ports(service: &str) -> anyhow::Result<(u16, u16)> {
    Ok(match service {
        "orchestrator" => (50051, 9464),
        "payment" => (50061, 9465),
        "store" => (50062, 9466),
        "rider" => (50063, 9467),
        "notifier" => (50064, 9468),
        other => bail!("unknown service {other}"),
    })
}

/// Checks a service's command: the default ports, on all interfaces (it runs in a
/// container), and returns its admin port.
fn check_service(argv: &[String], service: &str) -> anyhow::Result<Launch> {
    let launch = launch(argv)?;
    ensure!(
        launch.service == service,
        "{argv:?} runs {}, not {service}",
        launch.service
    );
    let (grpc, admin) = default_ports(service)?;
    let listen = launch
        .listen
        .with_context(|| format!("{service}: no --listen"))?;
    let admin_addr = launch
        .admin
        .with_context(|| format!("{service}: no --admin-listen"))?;
    ensure!(
        listen.port() == grpc,
        "{service} listens on {listen}, the default is {grpc}"
    );
    ensure!(
        admin_addr.port() == admin,
        "{service} admin on {admin_addr}, the default is {admin}"
    );
    ensure!(
        listen.ip().is_unspecified() && admin_addr.ip().is_unspecified(),
        "{service} must listen on 0.0.0.0 in a container"
    );
    if service == "orchestrator" {
        let default = default_ports("orchestrator")?;
        let code_default: SocketAddr = telemetry::DEFAULT_ADMIN_LISTEN.parse()?;
        ensure!(
            code_default.port() == default.1,
            "the admin port default moved"
        );
    }
    Ok(launch)
}

/// A healthcheck command probes `/healthz` (or `/readyz`) on `admin_port`.
fn check_healthcheck(argv: &[String], binary: &str, admin_port: u16) -> anyhow::Result<()> {
    let launch = launch(argv)?;
    ensure!(
        launch.binary == binary && launch.service == "healthcheck",
        "{argv:?}"
    );
    let url = launch.url.context("no --url")?;
    let rest = url
        .strip_prefix("http://127.0.0.1:")
        .with_context(|| url.clone())?;
    let (port, path) = rest.split_once('/').with_context(|| url.clone())?;
    ensure!(
        port.parse::<u16>()? == admin_port,
        "{url} is not the admin port {admin_port}"
    );
    let path = format!("/{path}");
    ensure!(
        telemetry::admin::PATHS.contains(&path.as_str()),
        "{path} is not served by the admin server"
    );
    Ok(())
}

/// The JSON-array instructions (`CMD [...]`, `HEALTHCHECK ... CMD [...]`) of each target.
fn dockerfile_targets(
    text: &str,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, Vec<String>>>> {
    let mut targets: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = String::new();
    // Join continuation lines first.
    let joined = text.replace("\\\n", " ");
    for line in joined.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction {
            "FROM" => {
                current = rest
                    .split_once(" AS ")
                    .map(|(_, name)| name.trim().to_owned())
                    .unwrap_or_default();
                targets.entry(current.clone()).or_default();
            }
            "ENTRYPOINT" => bail!("target {current} has an ENTRYPOINT; commands must be full argv"),
            "CMD" | "HEALTHCHECK" | "USER" => {
                let value = if instruction == "HEALTHCHECK" {
                    let at = rest
                        .find("CMD [")
                        .context("HEALTHCHECK without an exec-form CMD")?;
                    rest[at + 4..].to_owned()
                } else {
                    rest.to_owned()
                };
                let parsed = if instruction == "USER" {
                    vec![value]
                } else {
                    serde_json::from_str(&value).with_context(|| {
                        format!("{instruction} of {current} is not a JSON array")
                    })?
                };
                targets
                    .entry(current.clone())
                    .or_default()
                    .insert(instruction.to_owned(), parsed);
            }
            _ => {}
        }
    }
    Ok(targets)
}

#[test]
fn the_dockerfile_builds_every_binary_its_images_run() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile"))?;
    let targets = dockerfile_targets(&text)?;
    for (target, service, admin) in [
        ("orchestrator", "orchestrator", 9464),
        ("participant", "payment", 9465),
    ] {
        let instructions = targets
            .get(target)
            .with_context(|| format!("no target {target}"))?;
        let cmd = instructions
            .get("CMD")
            .with_context(|| format!("{target}: no CMD"))?;
        check_service(cmd, service)?;
        let health = instructions
            .get("HEALTHCHECK")
            .with_context(|| format!("{target}: no HEALTHCHECK"))?;
        check_healthcheck(health, target, admin)?;
        ensure!(
            instructions.get("USER").is_some_and(|u| u[0] == "nonroot"),
            "{target} must run as the non-root user"
        );
        ensure!(
            text.contains(&format!("--bin {target}")),
            "the build does not build {target}"
        );
    }
    let sagactl = targets.get("sagactl").context("no sagactl target")?;
    launch(sagactl.get("CMD").context("sagactl: no CMD")?)?;
    ensure!(text.contains("--bin sagactl"));
    ensure!(
        text.contains("COPY sagas/ /sagas/"),
        "the orchestrator image carries the definitions"
    );
    Ok(())
}

#[test]
fn compose_runs_every_service_with_real_commands_ports_and_probes() -> anyhow::Result<()> {
    let compose = yaml(&repo().join("deploy/compose.yaml"))?;
    let services = compose["services"].as_object().context("services")?;
    for needed in [
        "orchestrator",
        "payment",
        "store",
        "rider",
        "notifier",
        "jaeger",
        "prometheus",
        "grafana",
    ] {
        ensure!(
            services.contains_key(needed),
            "compose has no {needed} service"
        );
    }
    let mut admin_targets = BTreeSet::new();
    for service in ["orchestrator", "payment", "store", "rider", "notifier"] {
        let spec = &services[service];
        let argv = strings(&spec["command"]).with_context(|| format!("{service}: command"))?;
        let launch = check_service(&argv, service)?;
        let (_, admin) = default_ports(service)?;
        admin_targets.insert(format!("{service}:{admin}"));
        let test = strings(&spec["healthcheck"]["test"])?;
        ensure!(test[0] == "CMD", "{service}: healthcheck must be exec form");
        check_healthcheck(&test[1..], &launch.binary, admin)?;
        let target = spec["build"]["target"].as_str().context("build target")?;
        ensure!(
            target == launch.binary,
            "{service} is built as {target} but runs {}",
            launch.binary
        );
        let volumes = strings(&spec["volumes"])?;
        ensure!(
            volumes.iter().any(|v| v.ends_with(":/data")),
            "{service}: no /data volume"
        );
        if service == "orchestrator" {
            ensure!(
                volumes.iter().any(|v| v.starts_with("../sagas:/sagas")),
                "sagas/ is not mounted"
            );
            ensure!(
                argv.windows(2)
                    .any(|w| w[0] == "--sagas" && w[1] == "/sagas")
            );
            let named = volumes[0].split(':').next().context("volume")?;
            ensure!(
                compose["volumes"].get(named).is_some(),
                "named volume {named} is not declared"
            );
            // Every participant it calls is a service, at its default port.
            let names: BTreeSet<&str> = launch
                .participants
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            ensure!(
                names == BTreeSet::from(["payment", "rider", "store"]),
                "{names:?}"
            );
            for (name, url) in &launch.participants {
                let (grpc, _) = default_ports(name)?;
                ensure!(url == &format!("http://{name}:{grpc}"), "{name} at {url}");
            }
            let grace = launch.shutdown_grace.context("grace")?;
            let stop = spec["stop_grace_period"]
                .as_str()
                .context("stop_grace_period")?;
            let stop = saga_engine::duration::parse_duration(stop).map_err(anyhow::Error::msg)?;
            ensure!(
                stop > grace,
                "stop_grace_period {stop:?} must exceed the drain {grace:?}"
            );
        }
    }
    // Prometheus scrapes every admin endpoint.
    let prometheus = yaml(&repo().join("deploy/prometheus/prometheus.yml"))?;
    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"]
        .as_array()
        .context("scrape_configs")?
    {
        let path = job["metrics_path"].as_str().unwrap_or("/metrics");
        ensure!(telemetry::admin::PATHS.contains(&path), "{path}");
        for config in job["static_configs"].as_array().context("static_configs")? {
            scraped.extend(strings(&config["targets"])?);
        }
    }
    ensure!(
        scraped == admin_targets,
        "scraped {scraped:?}, admin endpoints {admin_targets:?}"
    );
    // Grafana gets the data source the dashboard names, and the dashboard folder.
    let datasources =
        yaml(&repo().join("deploy/grafana/provisioning/datasources/prometheus.yaml"))?;
    ensure!(datasources["datasources"][0]["uid"] == "prometheus");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("deploy/grafana/dashboards/saga-orchestrator.json"),
    )?)?;
    ensure!(dashboard["panels"][0]["datasource"]["uid"] == "prometheus");
    let grafana_volumes = strings(&services["grafana"]["volumes"])?;
    ensure!(
        grafana_volumes
            .iter()
            .any(|v| v.starts_with("./grafana/dashboards:"))
    );
    ensure!(
        grafana_volumes
            .iter()
            .any(|v| v.starts_with("./grafana/provisioning:"))
    );
    Ok(())
}

#[test]
fn kubernetes_manifests_match_the_code() -> anyhow::Result<()> {
    let base = repo().join("deploy/k8s");
    let kustomization = yaml(&base.join("kustomization.yaml"))?;
    let mut workloads = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut claims = BTreeSet::new();
    for resource in strings(&kustomization["resources"])? {
        let object = yaml(&base.join(&resource))?;
        let kind = object["kind"]
            .as_str()
            .with_context(|| format!("{resource}: kind"))?
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .context("name")?
            .to_owned();
        match kind.as_str() {
            "StatefulSet" | "Deployment" => {
                workloads.insert(name, object);
            }
            "Service" => {
                services.insert(name, object);
            }
            "PersistentVolumeClaim" => {
                claims.insert(name);
            }
            "Namespace" => {}
            other => bail!("{resource}: unexpected kind {other}"),
        }
    }
    let orchestrator = &workloads["orchestrator"];
    ensure!(orchestrator["kind"] == "StatefulSet" && orchestrator["spec"]["replicas"] == 1);
    ensure!(orchestrator["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data");

    for service in ["orchestrator", "payment", "store", "rider", "notifier"] {
        let workload = workloads
            .get(service)
            .with_context(|| format!("no workload {service}"))?;
        let pod = &workload["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        let mut argv = strings(&container["command"])?;
        argv.extend(strings(&container["args"])?);
        let launch = check_service(&argv, service)?;
        let (grpc, admin) = default_ports(service)?;
        // Named container ports are the ones the command listens on.
        let ports: BTreeMap<String, u64> = container["ports"]
            .as_array()
            .context("ports")?
            .iter()
            .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["containerPort"].as_u64()?)))
            .collect();
        ensure!(
            ports.get("grpc") == Some(&u64::from(grpc))
                && ports.get("admin") == Some(&u64::from(admin)),
            "{service}: {ports:?}"
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            let get = &container[probe]["httpGet"];
            let path = get["path"]
                .as_str()
                .with_context(|| format!("{service}: {probe}"))?;
            ensure!(
                telemetry::admin::PATHS.contains(&path),
                "{service}: {probe} on {path}"
            );
            ensure!(
                get["port"] == "admin" || get["port"] == admin,
                "{service}: {probe} port"
            );
        }
        ensure!(container["readinessProbe"]["httpGet"]["path"] == "/readyz");
        ensure!(container["livenessProbe"]["httpGet"]["path"] == "/healthz");
        let annotations = &pod["metadata"]["annotations"];
        ensure!(annotations["prometheus.io/scrape"] == "true");
        ensure!(
            annotations["prometheus.io/port"].as_str() == Some(admin.to_string().as_str()),
            "{service}: scrape port"
        );
        ensure!(annotations["prometheus.io/path"] == "/metrics");
        for kind in ["requests", "limits"] {
            ensure!(
                container["resources"][kind]["cpu"].is_string()
                    && container["resources"][kind]["memory"].is_string(),
                "{service}: {kind}"
            );
        }
        let grace = pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .context("terminationGracePeriodSeconds")?;
        if let Some(drain) = launch.shutdown_grace {
            ensure!(
                Duration::from_secs(grace) > drain,
                "{service}: grace {grace}s does not cover the drain {drain:?}"
            );
        }
        ensure!(pod["spec"]["securityContext"]["runAsNonRoot"] == true);
        // Its Service exposes the same ports, and the orchestrator reaches participants
        // by these names.
        let svc = services
            .get(service)
            .with_context(|| format!("no Service {service}"))?;
        let svc_ports: BTreeSet<u64> = svc["spec"]["ports"]
            .as_array()
            .context("service ports")?
            .iter()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        ensure!(
            svc_ports == BTreeSet::from([u64::from(grpc), u64::from(admin)]),
            "{service}: {svc_ports:?}"
        );
        if service != "orchestrator" {
            ensure!(
                claims.contains(&format!("{service}-data")),
                "{service}: no PVC"
            );
            ensure!(
                workload["spec"]["strategy"]["type"] == "Recreate",
                "{service}: one writer per sled directory"
            );
        }
        for (name, url) in &launch.participants {
            ensure!(
                services.contains_key(name),
                "the orchestrator calls {name}, which has no Service"
            );
            ensure!(url == &format!("http://{name}:{}", default_ports(name)?.0));
        }
    }

    // The definitions ConfigMap covers sagas/, with identical copies.
    let generated: Vec<String> = strings(&kustomization["configMapGenerator"][0]["files"])?;
    let mut shipped: Vec<String> = std::fs::read_dir(repo().join("sagas"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml"))
        .collect();
    shipped.sort();
    let mut listed: Vec<String> = generated
        .iter()
        .map(|f| f.trim_start_matches("sagas/").to_owned())
        .collect();
    listed.sort();
    ensure!(
        listed == shipped,
        "the ConfigMap lists {listed:?}, sagas/ has {shipped:?}"
    );
    for file in &shipped {
        let original = std::fs::read(repo().join("sagas").join(file))?;
        let copy = std::fs::read(base.join("sagas").join(file))?;
        ensure!(
            original == copy,
            "deploy/k8s/sagas/{file} differs from sagas/{file}: copy it again (cp sagas/*.yaml deploy/k8s/sagas/)"
        );
    }
    ensure!(
        orchestrator["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .context("volumes")?
            .iter()
            .any(|v| v["configMap"]["name"] == "sagas"),
        "the orchestrator does not mount the sagas ConfigMap"
    );
    Ok(())
}

#[test]
fn a_command_with_an_unknown_flag_is_caught() {
    // The checks above cannot pass blindly: a made-up flag or binary fails to parse.
    let bad = [
        "orchestrator",
        "serve",
        "--listen",
        "0.0.0.0:50051",
        "--no-such-flag",
    ]
    .map(String::from);
    assert!(launch(&bad).is_err());
    let bad = ["participant", "payment", "--port", "1"].map(String::from);
    assert!(launch(&bad).is_err());
    let bad = ["orchestratord", "serve"].map(String::from);
    assert!(launch(&bad).is_err());
    let wrong_port = [
        "participant",
        "store",
        "--listen",
        "0.0.0.0:50061",
        "--admin-listen",
        "0.0.0.0:9466",
    ]
    .map(String::from);
    assert!(check_service(&wrong_port, "store").is_err());
}
