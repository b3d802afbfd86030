//! Definitions through the API: every file in sagas/ loads against live participants
//! (descriptors by server reflection), invalid ones are refused with their lines.

use proto::saga::v1::{GetDefinitionRequest, ListDefinitionsRequest, PutDefinitionRequest};
use tests::{Cluster, sagas_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_in_sagas_is_loaded_and_served() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let listed = cluster
        .client
        .list_definitions(ListDefinitionsRequest {})
        .await?
        .into_inner();
    let mut files = 0;
    for entry in std::fs::read_dir(sagas_dir())? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        files += 1;
        let yaml = std::fs::read_to_string(&path)?;
        let name = yaml
            .lines()
            .find_map(|l| l.strip_prefix("name: "))
            .map(str::trim)
            .expect("definition has a name");
        assert!(
            listed.definitions.iter().any(|d| d.name == name),
            "{name} from {} not loaded",
            path.display()
        );
        let served = cluster
            .client
            .get_definition(GetDefinitionRequest {
                name: name.to_owned(),
                version: 0,
            })
            .await?
            .into_inner();
        assert_eq!(served.yaml, yaml, "the stored text is the file's text");
    }
    assert!(files >= 1);
    assert_eq!(listed.definitions.len(), files);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_definition_is_refused_with_its_lines() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let payment = format!(
        "http://{}",
        cluster.participant(participants::Kind::Payment).addr
    );
    let yaml = format!(
        "name: broken
version: 1
participants:
  payment: {{ endpoint: {payment} }}
steps:
  - name: pay
    participant: payment
    action:
      method: payment.v1.Payment/AuthorizeCharge
      request:
        order_ident: x
    compensation:
      method: payment.v1.Payment/Refund
  - name: pay
    participant: paymnt
    kind: pivot
    action:
      method: payment.v1.Payment/CaptureCharge
"
    );
    let err = cluster
        .client
        .put_definition(PutDefinitionRequest { yaml })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let message = err.message();
    for expected in [
        "PutDefinition:11: step `pay`: `action request.order_ident`: message `payment.v1.AuthorizeChargeRequest` has no field `order_ident`",
        "PutDefinition:13: step `pay`: compensation: service `payment.v1.Payment` has no method `Refund`",
        "PutDefinition:14: step `pay`: duplicate step name (first defined on line 6)",
        "PutDefinition:15: step `pay`: unknown participant `paymnt`",
    ] {
        assert!(
            message.contains(expected),
            "missing `{expected}` in:\n{message}"
        );
    }
    let listed = cluster
        .client
        .list_definitions(ListDefinitionsRequest {})
        .await?
        .into_inner();
    assert!(
        listed.definitions.iter().all(|d| d.name != "broken"),
        "nothing stored"
    );

    // A syntax error names its line too.
    let err = cluster
        .client
        .put_definition(PutDefinitionRequest {
            yaml: "name: x\nversion: 1\nsteps: [\n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("PutDefinition:"),
        "{}",
        err.message()
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_immutable_and_sagas_stay_pinned() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let original = std::fs::read_to_string(sagas_dir().join("order-placement.yaml"))?;
    // The file has no `version:`, so it was stored as version 1. Naming version 1 with a
    // different text is refused.
    let changed = original
        .replace("description: Authorize payment", "description: Changed")
        .replace(
            "name: order-placement\n",
            "name: order-placement\nversion: 1\n",
        );
    assert!(changed.contains("version: 1\n"));
    let err = cluster
        .client
        .put_definition(PutDefinitionRequest {
            yaml: changed.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(
        err.message().contains("version 1 already exists"),
        "{}",
        err.message()
    );
    // Same text again: accepted, not created.
    let same = cluster
        .client
        .put_definition(PutDefinitionRequest {
            yaml: original.clone(),
        })
        .await?
        .into_inner();
    assert!(!same.created);
    // A new version: new sagas use it; an old saga keeps version 1.
    let v1 = cluster
        .run(
            "order-placement",
            tests::order_input("o-v1", serde_json::json!({})),
        )
        .await?;
    let v2_yaml = changed.replace("version: 1", "version: 2");
    let v2 = cluster
        .client
        .put_definition(PutDefinitionRequest { yaml: v2_yaml })
        .await?
        .into_inner();
    assert!(v2.created);
    assert_eq!(v2.version, 2);
    let newer = cluster
        .run(
            "order-placement",
            tests::order_input("o-v2", serde_json::json!({})),
        )
        .await?;
    assert_eq!(newer.version, 2);
    let old = cluster
        .client
        .get_saga(proto::saga::v1::GetSagaRequest {
            saga_id: v1.saga_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(old.version, 1);
    cluster.shutdown().await
}
