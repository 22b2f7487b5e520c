//! Access control with real processes: a gateway with TLS (a self-signed certificate made here
//! with rcgen) and bearer tokens from a file, in front of a retriever that requires a shared
//! token from the gateway; a second, plaintext gateway without that token. No ranker is started
//! (skip_ranker).

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{RecommendOptions, RecommendRequest, RetrieveRequest};
use llamarec_tests::{binary, free_port, repo_root, wait_serving, Process};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CLIENT_TOKEN: &str = "client-token-0123456789";
const BACKEND_TOKEN: &str = "backend-shared-secret-42";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn tls_endpoint(addr: &str, ca_pem: &str) -> Endpoint {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect_timeout(Duration::from_secs(2))
}

/// Health over TLS, with no token at all: SERVING or the last error.
async fn tls_health(addr: &str, ca_pem: &str) -> Result<i32, String> {
    let channel = tls_endpoint(addr, ca_pem).connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let r = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map_err(|e| e.to_string())?;
    Ok(r.into_inner().status)
}

async fn wait_tls_serving(addr: &str, ca_pem: &str) {
    let start = Instant::now();
    loop {
        match tls_health(addr, ca_pem).await {
            Ok(1) => return,
            other => assert!(start.elapsed() < Duration::from_secs(120), "gateway {addr} not SERVING over TLS: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn recommend(token: Option<&str>) -> tonic::Request<RecommendRequest> {
    let mut r = tonic::Request::new(RecommendRequest {
        user_id: "42".into(),
        k: 5,
        options: Some(RecommendOptions { num_candidates: 0, skip_ranker: true }),
        ..Default::default()
    });
    r.set_timeout(Duration::from_secs(30));
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tokens_and_the_shared_backend_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_pem = cert.cert.pem();
    let cert_path = write(d, "gateway.pem", &ca_pem);
    let key_path = write(d, "gateway.key", &cert.signing_key.serialize_pem());
    let tokens_path = write(d, "tokens", &format!("# callers\n{CLIENT_TOKEN}\n\nanother-client\n"));
    let backend_path = write(d, "backend-token", &format!("{BACKEND_TOKEN}\n"));

    let retriever = format!("127.0.0.1:{}", free_port());
    let secure = format!("127.0.0.1:{}", free_port());
    let open = format!("127.0.0.1:{}", free_port());
    // `extra` goes into [gateway] itself, before its sub-tables.
    let gateway_section = |listen: &str, store: &str, extra: &str| {
        format!(
            "[gateway]\nlisten = \"{listen}\"\nmetrics_listen = \"127.0.0.1:{}\"\nretriever = \"{retriever}\"\n{extra}[gateway.rankers]\naddresses = []\n[gateway.store]\nkind = \"embedded\"\npath = \"{}\"\n",
            free_port(),
            d.join(store).display()
        )
    };
    let common = format!("[telemetry]\nlog_level = \"warn\"\n\n[retriever]\nlisten = \"{retriever}\"\nauth_token_file = \"{backend_path}\"\n\n");
    // The secure gateway: TLS, caller tokens from a file, the backend token from a file.
    let secure_config = write(
        d,
        "secure.toml",
        &format!(
            "{common}{}[gateway.tls]\ncert = \"{cert_path}\"\nkey = \"{key_path}\"\n[gateway.auth]\ntokens_file = \"{tokens_path}\"\n",
            gateway_section(&secure, "secure.redb", &format!("backend_token_file = \"{backend_path}\"\n"))
        ),
    );
    // A plaintext gateway without the backend token (and without caller tokens).
    let open_config = write(d, "open.toml", &format!("{common}{}", gateway_section(&open, "open.redb", "")));

    let _retriever = Process::start("retriever", &binary("retriever-service"), &["--config", &secure_config], &[]);
    let _secure = Process::start("gateway (TLS)", &binary("gateway"), &["--config", &secure_config], &[]);
    let _open = Process::start("gateway (plaintext)", &binary("gateway"), &["--config", &open_config], &[]);

    // Health needs no token: the retriever's over plaintext, the gateway's over TLS.
    wait_serving(&retriever, Duration::from_secs(60)).await.unwrap();
    wait_tls_serving(&secure, &ca_pem).await;
    wait_serving(&open, Duration::from_secs(60)).await.unwrap();

    // Over TLS: no token, a wrong token, then the right one.
    let mut client = GatewayClient::new(tls_endpoint(&secure, &ca_pem).connect().await.unwrap());
    let none = client.recommend(recommend(None)).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    assert!(none.message().contains("authorization: Bearer <token>"), "{}", none.message());
    let wrong = client.recommend(recommend(Some("client-token-012345678"))).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(wrong.message().contains("not valid"), "{}", wrong.message());
    let mut basic = recommend(None);
    basic.metadata_mut().insert("authorization", format!("Basic {CLIENT_TOKEN}").parse().unwrap());
    assert_eq!(client.recommend(basic).await.unwrap_err().code(), Code::Unauthenticated);
    let ok = client.recommend(recommend(Some(CLIENT_TOKEN))).await.unwrap().into_inner();
    assert_eq!(ok.items.len(), 5, "the gateway reached the retriever with the shared token");
    assert!(ok.history_length > 0);
    let other = client.recommend(recommend(Some("another-client"))).await.unwrap().into_inner();
    assert_eq!(other.items.len(), 5, "every token in the file is accepted");

    // A plaintext client cannot talk to the TLS port.
    let plain = match Endpoint::from_shared(format!("http://{secure}")).unwrap().connect_timeout(Duration::from_secs(2)).connect().await {
        Err(e) => Err(format!("connect: {e:?}")),
        Ok(channel) => {
            let mut r = tonic::Request::new(HealthCheckRequest { service: String::new() });
            r.set_timeout(Duration::from_secs(5));
            HealthClient::new(channel).check(r).await.map(|r| r.into_inner().status).map_err(|e| e.to_string())
        }
    };
    assert!(plain.is_err(), "plaintext against the TLS port answered: {plain:?}");
    // And a TLS client that does not trust the certificate is refused too.
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap().cert.pem();
    assert!(tls_health(&secure, &stranger).await.is_err(), "an untrusted certificate was accepted");

    // The retriever itself: refused without the shared token, served with it.
    let mut direct = RetrieverClient::connect(format!("http://{retriever}")).await.unwrap();
    let retrieve = |token: Option<&str>| {
        let mut r = tonic::Request::new(RetrieveRequest { history: vec!["1".into(), "50".into()], k: 5, exclude_history: true, ..Default::default() });
        llamarec_common::auth::set_bearer(r.metadata_mut(), token);
        r
    };
    assert_eq!(direct.retrieve(retrieve(None)).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(direct.retrieve(retrieve(Some(CLIENT_TOKEN))).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(direct.retrieve(retrieve(Some(BACKEND_TOKEN))).await.unwrap().into_inner().items.len(), 5);

    // The gateway without the backend token: the retriever refuses it, and the caller gets a
    // status that says so (INTERNAL: a deployment error, not the caller's credentials).
    let mut open_client: GatewayClient<Channel> = GatewayClient::connect(format!("http://{open}")).await.unwrap();
    let refused = open_client.recommend(recommend(None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    assert!(refused.message().contains("backend_token"), "{}", refused.message());
    assert!(refused.message().contains("retriever"), "{}", refused.message());

    // The CLI: --tls-ca and --token reach the secure gateway; without the token it fails.
    let cli = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(binary("llamarec"));
        cmd.args(["recommend", "--user", "42", "--k", "3", "--skip-ranker", "--json", "--gateway", &secure, "--tls-ca", &cert_path, "--tls-domain", "localhost"])
            .current_dir(repo_root())
            .env_remove("LLAMAREC_TOKEN");
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.output().unwrap()
    };
    let out = cli(Some(CLIENT_TOKEN));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["items"].as_array().map(Vec::len), Some(3), "{json}");
    let out = cli(None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Recommend failed") && stderr.contains("authorization: Bearer <token>"), "{stderr}");
}
