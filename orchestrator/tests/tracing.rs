//! Distributed tracing across real processes: the target service, the draft service and
//! `ouro serve` run as three processes exporting over OTLP to a collector in this test
//! (the opentelemetry-proto trace service). One `Generate` that carries a client
//! `traceparent` must come back as one trace: the orchestrator's request, rounds, draft
//! and verify calls, the draft service's call and its batched forwards, the target's
//! batched forward, each linked to its parent across the process boundaries.

mod common;

use candle_core::quantized::GgmlDType;
use common::{Procs, binary, free_port, wait_for};
use engine::Architecture;
use engine::testing::{random_weights, tiny_config, write_gguf};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use orchestrator::remote::{RemoteDraft, RemoteTarget};
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::wrappers::TcpListenerStream;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One exported span, flattened with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    links: usize,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    links: span.links.len(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_generate_is_one_trace_across_the_three_services() {
    // The collector.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // Tiny models and a tokenizer for their vocabulary.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    let w = random_weights(&cfg, 17, true, false).unwrap();
    let (target, draft) = (dir.path().join("t.gguf"), dir.path().join("d.gguf"));
    write_gguf(&target, &cfg, &w, GgmlDType::F32).unwrap();
    write_gguf(&draft, &cfg, &w, GgmlDType::Q8_0).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    common::word_tokenizer(cfg.vocab_size)
        .save(&tokenizer, false)
        .unwrap();

    let env = |c: &mut Command| {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_SDK_DISABLED")
            .env_remove("OTEL_TRACES_EXPORTER");
    };
    let (pt, pd, po) = (free_port(), free_port(), free_port());
    let mut procs = Procs(Vec::new());
    for (service, model, port) in [
        ("target-service", &target, pt),
        ("draft-service", &draft, pd),
    ] {
        let mut cmd = Command::new(binary(service));
        cmd.arg("--model")
            .arg(model)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        env(&mut cmd);
        procs.spawn(service, &mut cmd);
    }
    let (turl, durl) = (
        format!("http://127.0.0.1:{pt}"),
        format!("http://127.0.0.1:{pd}"),
    );
    wait_for(&mut procs, "target-service", || {
        RemoteTarget::connect(&turl)
    })
    .await;
    wait_for(&mut procs, "draft-service", || RemoteDraft::connect(&durl)).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ouro"));
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{po}")])
        .args(["--target-endpoint", &turl, "--draft-endpoint", &durl])
        .arg("--tokenizer")
        .arg(&tokenizer)
        .args(["--skip-profile", "--level", "4", "--window", "2"])
        .args(["--guess", "2", "--gamma", "3"]);
    env(&mut cmd);
    procs.spawn("ouro serve", &mut cmd);
    let ourl = format!("http://127.0.0.1:{po}");
    let mut client = wait_for(&mut procs, "ouro serve", || async {
        Ok(OuroborosClient::connect(ourl.clone()).await?)
    })
    .await;

    let mut request = tonic::Request::new(pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(
            "w5 w9 w5 w9 w5 w9 w12".into(),
        )),
        max_new_tokens: Some(12),
        strategy: pb::Strategy::Ouroboros as i32,
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    let response = client.generate(request).await.unwrap().into_inner();
    assert_eq!(response.token_ids.len(), 12);
    let stats = response.stats.unwrap();
    assert!(stats.draft_calls > 0, "the draft was not called: {stats:?}");

    const ORCH: &str = "ouroboros-orchestrator";
    const TARGET: &str = "ouroboros-target";
    const DRAFT: &str = "ouroboros-draft";
    // Wait until every span's parent has arrived too (the services export in batches).
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        procs.check_alive();
        let spans: Vec<Got> = collector
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == TRACE_ID)
            .cloned()
            .collect();
        let ids: HashSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
        let orphans = spans
            .iter()
            .filter(|s| s.parent != CLIENT_SPAN && !ids.contains(s.parent.as_str()))
            .count();
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        // Children can arrive after their parents: also wait for every round's calls to
        // have their server side (a batch from one service may lag another's).
        let count = |service: &str, name: &str| {
            spans
                .iter()
                .filter(|s| s.service == service && s.name == name)
                .count()
        };
        let verifies = count(TARGET, "ouroboros.target.v1.TargetService/Verify");
        let complete = count(ORCH, "round") == verifies
            && count(TARGET, "forward") >= verifies + count(TARGET, "prefill")
            && count(DRAFT, "ouroboros.draft.v1.DraftService/Draft") as u64 == stats.draft_calls;
        if (orphans == 0 && complete && services.len() == 3 && count(ORCH, "generate") == 1)
            || Instant::now() > deadline
        {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by_id: HashMap<&str, &Got> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    let describe = || {
        spans
            .iter()
            .map(|s| format!("{}:{} {} <- {}", s.service, s.name, s.id, s.parent))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let named = |service: &str, name: &str| -> Vec<&Got> {
        spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };
    let parent_of = |s: &Got| by_id.get(s.parent.as_str()).copied();

    // Every span of the request is in the client's trace and hangs from a known parent;
    // the only other traces are the Info calls made while connecting.
    let others: Vec<Got> = collector
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace != TRACE_ID)
        .cloned()
        .collect();
    for s in &others {
        assert!(
            s.name.ends_with("/Info") && s.parent.is_empty(),
            "{}:{} outside the client's trace",
            s.service,
            s.name
        );
    }
    for s in &spans {
        assert!(
            s.parent == CLIENT_SPAN || by_id.contains_key(s.parent.as_str()),
            "{}:{} has an unknown parent {}\n{}",
            s.service,
            s.name,
            s.parent,
            describe()
        );
    }
    // The orchestrator's server span continues the client's span.
    let server = named(ORCH, "ouroboros.v1.Ouroboros/Generate");
    assert_eq!(server.len(), 1, "{}", describe());
    assert_eq!(server[0].parent, CLIENT_SPAN);
    let generate = named(ORCH, "generate");
    assert_eq!(generate.len(), 1, "{}", describe());
    assert_eq!(generate[0].parent, server[0].id);
    // Rounds under the request; draft and verify calls under the rounds.
    let rounds = named(ORCH, "round");
    assert!(!rounds.is_empty(), "{}", describe());
    for r in &rounds {
        assert_eq!(r.parent, generate[0].id);
    }
    for call in ["verify", "draft"] {
        let calls = named(ORCH, call);
        assert!(!calls.is_empty(), "no {call} spans\n{}", describe());
        for c in calls {
            assert_eq!(parent_of(c).map(|p| p.name.as_str()), Some("round"));
        }
    }
    // Across the wire: the target's Verify under the orchestrator's verify call, its
    // batched forward under that (the prompt's prefill has forwards of its own, below);
    // the draft service's Draft under the draft call, its call and forwards under that.
    let verifies = named(TARGET, "ouroboros.target.v1.TargetService/Verify");
    assert_eq!(verifies.len(), rounds.len(), "{}", describe());
    for v in &verifies {
        let p = parent_of(v).unwrap();
        assert_eq!((p.service.as_str(), p.name.as_str()), (ORCH, "verify"));
    }
    let forwards = named(TARGET, "forward");
    let under = |parent: &str| {
        forwards
            .iter()
            .filter(|f| parent_of(f).is_some_and(|p| p.name == parent))
            .count()
    };
    assert_eq!(
        under("ouroboros.target.v1.TargetService/Verify"),
        verifies.len(),
        "{}",
        describe()
    );
    assert_eq!(
        under("ouroboros.target.v1.TargetService/Verify") + under("prefill"),
        forwards.len(),
        "{}",
        describe()
    );
    // A lone request's forwards serve nobody else.
    assert!(forwards.iter().all(|f| f.links == 0), "{}", describe());
    let drafts = named(DRAFT, "ouroboros.draft.v1.DraftService/Draft");
    assert_eq!(drafts.len() as u64, stats.draft_calls, "{}", describe());
    for d in &drafts {
        let p = parent_of(d).unwrap();
        assert_eq!((p.service.as_str(), p.name.as_str()), (ORCH, "draft"));
    }
    for l in named(DRAFT, "draft") {
        assert_eq!(
            parent_of(l).unwrap().name,
            "ouroboros.draft.v1.DraftService/Draft"
        );
    }
    assert_eq!(named(DRAFT, "draft").len(), drafts.len());
    // The draft's forwards run on its scheduler, each under the first call it serves.
    let draft_forwards = named(DRAFT, "draft forward");
    assert!(draft_forwards.len() >= drafts.len(), "{}", describe());
    for f in &draft_forwards {
        assert_eq!(parent_of(f).unwrap().name, "draft", "{}", describe());
    }
    // Session set-up is in the trace too: the target's prefill under its OpenSession.
    let opens = named(TARGET, "ouroboros.target.v1.TargetService/OpenSession");
    assert_eq!(opens.len(), 1, "{}", describe());
    let prefill = named(TARGET, "prefill");
    assert_eq!(prefill.len(), 1);
    assert_eq!(prefill[0].parent, opens[0].id);
    assert!(under("prefill") >= 1, "{}", describe());
}
