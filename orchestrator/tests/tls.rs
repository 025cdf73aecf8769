//! TLS and mutual TLS between the orchestrator and a target service, and on the public
//! API: with the right certificates calls work; a client without a certificate, or with
//! one another CA signed, or speaking plaintext, is refused; health answers in plaintext on
//! its own port for probes that cannot speak TLS.

mod common;

use orchestrator::remote::{BackendTlsArgs, CallLimits, RemoteTarget};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use serving::server::Listening;
use std::path::{Path, PathBuf};
use target_service::{TargetConfig, TargetGrpc};
use tonic::transport::Certificate;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A CA, and certificates it signs, written as PEM files into a folder.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Self { issuer, dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` (server) or a client; returns (cert, key) paths.
    fn sign(
        &self,
        who: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, who);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{who}.pem")),
            self.dir.join(format!("{who}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// How a server started with these TLS flags listens.
fn listening(cert: &Path, key: &Path, client_ca: Option<&Path>, health: Option<u16>) -> Listening {
    let flags = serving::tls::TlsArgs {
        tls_cert: Some(cert.to_path_buf()),
        tls_key: Some(key.to_path_buf()),
        tls_client_ca: client_ca.map(Path::to_path_buf),
        health_listen: health.map(|p| format!("127.0.0.1:{p}")),
    };
    flags.listening().unwrap()
}

async fn listener() -> (tokio::net::TcpListener, u16) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// Connects to the target at `port` as the orchestrator does, with these backend TLS
/// settings (the name checked is the endpoint's host: localhost).
async fn connect(port: u16, tls: BackendTlsArgs) -> anyhow::Result<RemoteTarget> {
    let spec = format!("http://localhost:{port}");
    let limits = CallLimits {
        tls: tls.for_endpoint(&spec)?,
        ..CallLimits::TARGET
    };
    // The replicas connect to resolved addresses; the name stays the one given.
    RemoteTarget::connect_for(&format!("http://127.0.0.1:{port}"), 0, &limits).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_the_orchestrator_and_a_target() {
    use decoding::TargetBackend;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let rogue = Ca::new(dir.path(), "rogue-ca");
    let (server_cert, server_key) = ca.sign(
        "target",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = ca.sign("orchestrator", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let impostor = rogue.sign("impostor", &[], ExtendedKeyUsagePurpose::ClientAuth);

    let (tp, _) = common::tiny_pair(dir.path(), 17);
    let (l, port) = listener().await;
    let (hl, health_port) = listener().await;
    drop(hl);
    let listening = listening(&server_cert, &server_key, Some(&ca.ca()), Some(health_port));
    tokio::spawn(target_service::serve_draining(
        TargetGrpc::new(common::load(&tp), TargetConfig::default()),
        l,
        std::future::pending(),
        async {},
        listening,
    ));

    // The orchestrator's certificate, signed by the CA the target trusts: calls work.
    let good = BackendTlsArgs {
        backend_tls_ca: Some(ca.ca()),
        backend_tls_cert: Some(client.0.clone()),
        backend_tls_key: Some(client.1.clone()),
        backend_tls_server_name: None,
    };
    let target = connect(port, good.clone()).await.unwrap();
    let id = target.open(&[3, 4, 5]).await.unwrap();
    let tree = decoding::DraftTree::from_parts(vec![5, 6], vec![-1, 0]).unwrap();
    let greedy = decoding::SamplingParams::greedy();
    target.verify(id, &tree, &greedy, None).await.unwrap();
    target.close(id).await.unwrap();

    // No client certificate, one from another CA, or plaintext: refused.
    let no_cert = BackendTlsArgs {
        backend_tls_cert: None,
        backend_tls_key: None,
        ..good.clone()
    };
    let foreign = BackendTlsArgs {
        backend_tls_cert: Some(impostor.0),
        backend_tls_key: Some(impostor.1),
        ..good.clone()
    };
    for (what, tls) in [
        ("no client certificate", no_cert),
        ("a certificate of another CA", foreign),
        ("plaintext", BackendTlsArgs::default()),
    ] {
        assert!(connect(port, tls).await.is_err(), "{what} was let in");
    }
    // A server the client's CA did not sign is refused by the client.
    let trusting_rogue = BackendTlsArgs {
        backend_tls_ca: Some(rogue.ca()),
        ..good
    };
    assert!(connect(port, trusting_rogue).await.is_err());

    // Health, and only health, in plaintext on its own port.
    let plain = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(plain.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let mut api = proto::target::v1::target_service_client::TargetServiceClient::new(plain);
    let e = api
        .open_session(proto::target::v1::OpenSessionRequest { tokens: vec![1, 2] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
}

/// The public API over TLS with API keys: a TLS client with the key is served, one without
/// gets UNAUTHENTICATED, and a plaintext client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_api_over_tls_with_api_keys() {
    use proto::v1 as pb;
    use proto::v1::ouroboros_client::OuroborosClient;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "public-ca");
    let (cert, key) = ca.sign("api", &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let (_pipeline, service) =
        common::embedded_service(dir.path(), orchestrator::embedded::Limits::default(), 4);
    let keys = orchestrator::auth::ApiKeys::new(["k1"]).unwrap();
    let service = service.with_api_keys(keys);
    let (l, port) = listener().await;
    let (_up, ready) = tokio::sync::watch::channel(true);
    let listening = listening(&cert, &key, None, None);
    tokio::spawn(orchestrator::serve_ready(
        service,
        l,
        std::future::pending(),
        ready,
        serving::server::Signal::Readiness,
        listening,
    ));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca.ca()).unwrap()))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = |key: Option<&str>| {
        let mut r = tonic::Request::new(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt("w3 w4".into())),
            max_new_tokens: Some(3),
            ..Default::default()
        });
        if let Some(k) = key {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        r
    };
    let mut client = OuroborosClient::new(channel);
    let r = client.generate(request(Some("k1"))).await.unwrap();
    assert_eq!(r.into_inner().token_ids.len(), 3);
    let e = client.generate(request(None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let plain = OuroborosClient::connect(format!("http://127.0.0.1:{port}")).await;
    match plain {
        Err(_) => {}
        Ok(mut c) => assert!(c.generate(request(Some("k1"))).await.is_err()),
    }
}
