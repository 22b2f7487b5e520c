//! Access control with real processes: a gateway with TLS (a self-signed certificate made here
//! with rcgen) and bearer tokens from a file, in front of a retriever that requires a shared
//! token from the gateway; a second, plaintext gateway without that token (no ranker:
//! skip_ranker). Then the backend links themselves over TLS: retriever and ranker serving TLS
//! with a certificate from a CA made here, the gateway dialling both with
//! `[gateway.backend_tls]` and ranking through them, plaintext clients refused, and health
//! answered over TLS (`llamarec health --tls-ca`) and on the plaintext `health_listen` port.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{RecommendOptions, RecommendRequest, RetrieveRequest};
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::RankRequest;
use llamarec_tests::setup::{self, Addrs, Extra, Store};
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

    // `llamarec health` (the Docker HEALTHCHECK) speaks TLS with --tls-ca; in plaintext it
    // fails against the TLS port, with the address in the message.
    let (ok, stderr) = cli_health(&secure, &["--tls-ca", &cert_path, "--tls-domain", "localhost"]);
    assert!(ok, "{stderr}");
    let (ok, stderr) = cli_health(&secure, &[]);
    assert!(!ok && stderr.contains(&secure), "{stderr}");

    // `eval --via-gateway` and `replay` take the same --tls-ca/--token (GatewayAccess).
    let llamarec = |args: &[&str]| {
        std::process::Command::new(binary("llamarec")).args(args).current_dir(repo_root()).env_remove("LLAMAREC_TOKEN").env_remove("LLAMAREC_TLS_CA").output().unwrap()
    };
    let tls_args = ["--tls-ca", cert_path.as_str(), "--tls-domain", "localhost"];
    let out = llamarec(&[&["eval", "--stage", "retriever", "--split", "test", "--sample", "3", "--via-gateway", &secure, "--token", CLIENT_TOKEN][..], &tls_args].concat());
    assert!(out.status.success(), "eval --via-gateway over TLS: {}", String::from_utf8_lossy(&out.stderr));
    let out = llamarec(&[&["eval", "--stage", "retriever", "--split", "test", "--sample", "3", "--via-gateway", &secure][..], &tls_args].concat());
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("authorization: Bearer <token>"), "eval without the token");
    let traffic = d.join("traffic.jsonl").display().to_string();
    let out = llamarec(&["traffic", "synth", "--out", &traffic, "--rate", "20", "--duration", "1", "--skip-ranker-share", "1", "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = d.join("replay.json");
    let replay = |token: Option<&str>| -> serde_json::Value {
        let mut args = vec!["replay", "--traffic", traffic.as_str(), "--gateway", secure.as_str(), "--rate", "20", "--duration", "1", "--arrivals", "uniform", "--json", report.to_str().unwrap()];
        args.extend(tls_args);
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        let out = llamarec(&args);
        assert!(out.status.success(), "replay: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
    };
    let r = replay(Some(CLIENT_TOKEN));
    assert_eq!((r["sent"].as_u64(), r["errors"].as_u64()), (Some(20), Some(0)), "replay with the token over TLS: {}", r["errors_by_code"]);
    let r = replay(None);
    assert_eq!(r["errors_by_code"]["Unauthenticated"].as_u64(), Some(20), "replay without the token: {}", r["errors_by_code"]);

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

/// A CA and one server certificate it signed, for "localhost" only (not 127.0.0.1: the gateway
/// must name the backends with `retriever_domain` / `ranker_domain`, as it must in Kubernetes
/// where it dials pod addresses), usable as a client certificate too.
struct BackendPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn backend_pki() -> BackendPki {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    ca.distinguished_name.push(rcgen::DnType::CommonName, "llamarec test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    leaf.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate().unwrap();
    let cert_pem = leaf.signed_by(&leaf_key, &issuer).unwrap().pem();
    BackendPki { ca_pem, cert_pem, key_pem: leaf_key.serialize_pem() }
}

/// `llamarec health ADDR` with extra arguments: (success, stderr).
fn cli_health(addr: &str, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(binary("llamarec"))
        .args(["health", addr, "--timeout-s", "3"])
        .args(extra)
        .current_dir(repo_root())
        .env_remove("LLAMAREC_TLS_CA")
        .env_remove("LLAMAREC_TLS_DOMAIN")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Health over plaintext on `addr`: SERVING or the last error, within a few seconds.
async fn plaintext_health(addr: &str) -> Result<i32, String> {
    let call = async {
        let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(2)).connect().await.map_err(|e| format!("connect: {e:?}"))?;
        let r = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map_err(|e| e.to_string())?;
        Ok(r.into_inner().status)
    };
    tokio::time::timeout(Duration::from_secs(5), call).await.unwrap_or_else(|_| Err("no answer in 5 s".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_ranks_through_tls_backends_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = backend_pki();
    let ca = write(d, "ca.pem", &pki.ca_pem);
    let cert = write(d, "backend.pem", &pki.cert_pem);
    let key = write(d, "backend.key", &pki.key_pem);
    let token = write(d, "backend-token", &format!("{BACKEND_TOKEN}\n"));
    let (retriever_health, ranker_health) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));

    let addrs = Addrs::new();
    // Both backends: TLS that also requires a client certificate from the same CA (mutual TLS),
    // the shared token, and a plaintext health-only port.
    let backend = |health: &str| {
        format!("auth_token_file = \"{token}\"\nhealth_listen = \"{health}\"\n[TABLE.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nclient_ca = \"{ca}\"\n")
    };
    let retriever_extra = backend(&retriever_health).replace("TABLE", "retriever");
    let ranker_extra = backend(&ranker_health).replace("TABLE", "ranker");
    let gateway_extra = format!(
        "backend_token_file = \"{token}\"\n[gateway.backend_tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nretriever_domain = \"localhost\"\nranker_domain = \"localhost\"\n"
    );
    let extra = Extra {
        log_level: Some("warn"),
        retriever: &retriever_extra,
        ranker: &ranker_extra,
        gateway: &gateway_extra,
        ranker_weight: Some(0.5),
        ..Default::default()
    };
    let config = setup::write_config(d, &addrs, &[&addrs.ranker], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let _ranker = setup::start("ranker", &config);
    let _gateway = setup::start("gateway", &config);

    // The health-only ports answer in plaintext (what Kubernetes' gRPC probes use), and the
    // gateway itself is plaintext here.
    wait_serving(&retriever_health, Duration::from_secs(60)).await.unwrap();
    wait_serving(&ranker_health, Duration::from_secs(180)).await.unwrap();
    wait_serving(&addrs.gateway, Duration::from_secs(60)).await.unwrap();

    // Ranked through both TLS links: the ranker's scores are in the answer, nothing degraded.
    let mut client = GatewayClient::connect(format!("http://{}", addrs.gateway)).await.unwrap();
    let mut request = recommend(None);
    request.get_mut().options = Some(RecommendOptions { num_candidates: 0, skip_ranker: false });
    let r = client.recommend(request).await.unwrap().into_inner();
    assert!(!r.degraded, "{:?}: {}", r.degraded_reason(), r.degraded_detail);
    assert_eq!(r.items.len(), 5);
    assert!(r.ranker_model.is_some(), "the ranker answered");
    assert!(r.items.iter().all(|i| i.ranker_log_prob.is_some()), "every item carries its ranker score");
    assert!(r.history_length > 0);

    // Plaintext clients are refused by both TLS listeners, even with the right token.
    for addr in [&addrs.retriever, &addrs.ranker] {
        let plain = plaintext_health(addr).await;
        assert!(plain.is_err(), "plaintext against the TLS port {addr} answered: {plain:?}");
    }
    let plain_rank = async {
        let mut ranker = RankerClient::connect(format!("http://{}", addrs.ranker)).await.map_err(|e| e.to_string())?;
        let mut rank = tonic::Request::new(RankRequest { history_titles: vec!["Toy Story (1995)".into()], candidate_titles: vec!["Heat (1995)".into()] });
        llamarec_common::auth::set_bearer(rank.metadata_mut(), Some(BACKEND_TOKEN));
        rank.set_timeout(Duration::from_secs(5));
        ranker.rank(rank).await.map_err(|e| e.to_string())
    };
    let plain_rank = tokio::time::timeout(Duration::from_secs(10), plain_rank).await.unwrap_or_else(|_| Err("no answer".into()));
    assert!(plain_rank.is_err(), "a plaintext Rank call was served: {plain_rank:?}");

    // A TLS client with the CA but without a client certificate is refused too (client_ca).
    let no_identity = async {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{}", addrs.retriever)).unwrap().tls_config(tls).unwrap().connect().await.map_err(|e| format!("{e:?}"))?;
        let mut r = tonic::Request::new(RetrieveRequest { history: vec!["1".into()], k: 5, ..Default::default() });
        llamarec_common::auth::set_bearer(r.metadata_mut(), Some(BACKEND_TOKEN));
        RetrieverClient::new(channel).retrieve(r).await.map_err(|e| e.to_string())
    };
    let no_identity = tokio::time::timeout(Duration::from_secs(10), no_identity).await.unwrap_or_else(|_| Err("no answer".into()));
    assert!(no_identity.is_err(), "a TLS client without a certificate was served: {no_identity:?}");

    // The health-only port serves health and nothing else: no Rank there, token or not.
    let mut on_health_port = RankerClient::connect(format!("http://{ranker_health}")).await.unwrap();
    let mut rank = tonic::Request::new(RankRequest { history_titles: vec![], candidate_titles: vec!["Heat (1995)".into()] });
    llamarec_common::auth::set_bearer(rank.metadata_mut(), Some(BACKEND_TOKEN));
    assert_eq!(on_health_port.rank(rank).await.unwrap_err().code(), Code::Unimplemented);

    // `llamarec health` in plaintext fails against a TLS listener and succeeds on the
    // health-only port. (Over TLS it is in the first test: these backends also want a client
    // certificate, which the CLI does not present.)
    let (ok, stderr) = cli_health(&addrs.ranker, &[]);
    assert!(!ok, "plaintext `llamarec health` against a TLS listener succeeded");
    assert!(stderr.contains(&addrs.ranker), "{stderr}");
    let (ok, stderr) = cli_health(&ranker_health, &[]);
    assert!(ok, "{stderr}");
}
