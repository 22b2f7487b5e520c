//! The real `retriever-service` binary with the shipped ML-100K checkpoint, over gRPC on
//! loopback: Retrieve for a real history, Info, the popularity fallback, and every
//! INVALID_ARGUMENT case with the message that names the problem.

use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{InfoRequest, RetrieveRequest};
use llamarec_tests::{binary, free_port, wait_serving, Process};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const MAX_K: u32 = 50;
const MAX_HISTORY: u32 = 300;

/// Items user 1 of MovieLens-100K rated (external ids of the shipped catalog).
fn user_history() -> Vec<String> {
    ["1", "50", "181", "258", "100", "127", "174", "7", "98", "56", "172", "121", "117", "222", "234", "25", "268", "237", "204", "69"]
        .map(String::from)
        .to_vec()
}

async fn start() -> (Process, RetrieverClient<Channel>) {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("retriever.toml");
    std::fs::write(
        &config,
        format!(
            "[telemetry]\nlog_level = \"warn\"\n\n[retriever]\nlisten = \"{addr}\"\ncheckpoint = \"retriever-service/checkpoints/ml-100k\"\nmax_k = {MAX_K}\nmax_history = {MAX_HISTORY}\nmax_message_bytes = 1048576\n"
        ),
    )
    .unwrap();
    let process = Process::start("retriever-service", &binary("retriever-service"), &["--config", config.to_str().unwrap()], &[]);
    wait_serving(&addr, Duration::from_secs(30)).await.unwrap();
    let client = RetrieverClient::connect(format!("http://{addr}")).await.unwrap();
    (process, client)
}

fn request(history: Vec<String>, k: u32) -> RetrieveRequest {
    RetrieveRequest { history, k, exclude_history: true, ..Default::default() }
}

#[tokio::test]
async fn retrieves_for_real_histories_and_rejects_bad_requests_by_name() {
    let (_process, mut client) = start().await;

    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    let model = info.model.clone().unwrap();
    assert_eq!(model.name, "lrurec");
    assert!(model.version.len() == 12 && model.version.chars().all(|c| c.is_ascii_hexdigit()), "version {:?}", model.version);
    assert_eq!((info.num_items, info.max_k, info.max_history, info.embedding_dim), (1349, MAX_K, MAX_HISTORY, 64));
    assert_eq!(info.dataset, "ml-100k");

    let history = user_history();
    let mut tagged = tonic::Request::new(request(history.clone(), 20));
    tagged.metadata_mut().insert("x-request-id", "test-1".parse().unwrap());
    let response = client.retrieve(tagged).await.unwrap().into_inner();
    assert_eq!(response.items.len(), 20);
    assert!(!response.popularity_fallback);
    assert_eq!(response.model, Some(model.clone()));
    assert!(response.compute_us > 0);
    assert!(response.items.iter().all(|i| !history.contains(&i.item_id)), "history items must be excluded");
    assert!(response.items.iter().all(|i| !i.title.is_empty()), "every candidate has a title");
    assert!(response.items.windows(2).all(|w| w[0].score >= w[1].score), "best first");
    let mut ids: Vec<&str> = response.items.iter().map(|i| i.item_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20, "no duplicates");

    // Without exclusion the model may return history items; k is still honoured.
    let open = client.retrieve(RetrieveRequest { exclude_history: false, ..request(history.clone(), 5) }).await.unwrap().into_inner();
    assert_eq!(open.items.len(), 5);

    let empty = client.retrieve(request(Vec::new(), 10)).await.unwrap().into_inner();
    assert!(empty.popularity_fallback);
    assert_eq!(empty.items.len(), 10);
    assert!(empty.items.windows(2).all(|w| w[0].score >= w[1].score), "most popular first");

    let cases = [
        (request(vec!["1".into(), "no-such-item".into()], 10), "\"no-such-item\""),
        (request(history.clone(), 0), &format!("k is 0; it must be within 1..={MAX_K} ([retriever] max_k)") as &str),
        (request(history.clone(), MAX_K + 1), &format!("k is {}; it must be within 1..={MAX_K} ([retriever] max_k)", MAX_K + 1)),
        (request(vec!["1".to_string(); MAX_HISTORY as usize + 1], 10), &format!("history is {} items; the limit is {MAX_HISTORY} ([retriever] max_history)", MAX_HISTORY + 1)),
        (request(vec!["1".to_string(), "9".repeat(129)], 10), "history[1] is 129 bytes; the limit is 128 ([retriever] max_item_id_len)"),
    ];
    for (req, message) in cases {
        let status = client.retrieve(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(message), "{:?} does not contain {message:?}", status.message());
    }
    assert!(client.retrieve(request(vec!["1".into(), "no-such-item".into()], 10)).await.unwrap_err().message().contains("history[1]"));
    // A message over `max_message_bytes` (1 MiB here) is refused by the server before decoding.
    let status = client.retrieve(request(vec!["1".repeat(2 << 20)], 10)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("the limit is: 1048576 bytes"), "{}", status.message());
}

/// The gateway's fast path: the same history as dense indices gives the same answer as external
/// ids; with `indices_only` the items carry just index and score; indices against another
/// catalog, or without a fingerprint, are refused by name.
#[tokio::test]
async fn dense_indices_match_external_ids_and_are_checked_against_the_catalog() {
    let (_process, mut client) = start().await;
    let fingerprint = client.info(InfoRequest {}).await.unwrap().into_inner().catalog_fingerprint;
    assert_ne!(fingerprint, 0);

    // Learn the indices of 20 real items from an answer by id, then use them as a history.
    let seed = client.retrieve(request(user_history(), 20)).await.unwrap().into_inner();
    assert!(seed.items.iter().all(|i| (1..=1349).contains(&i.item_index)), "every item names its index");
    let ids: Vec<String> = seed.items.iter().map(|i| i.item_id.clone()).collect();
    let indices: Vec<u32> = seed.items.iter().map(|i| i.item_index).collect();
    let dense = |indices: Vec<u32>, fingerprint: u64, indices_only: bool| RetrieveRequest {
        history_indices: indices,
        k: 20,
        exclude_history: true,
        catalog_fingerprint: fingerprint,
        indices_only,
        ..Default::default()
    };

    let by_id = client.retrieve(request(ids.clone(), 20)).await.unwrap().into_inner();
    let by_index = client.retrieve(dense(indices.clone(), fingerprint, false)).await.unwrap().into_inner();
    assert_eq!(by_index.items, by_id.items, "same candidates, scores, ids and titles");
    let bare = client.retrieve(dense(indices.clone(), fingerprint, true)).await.unwrap().into_inner();
    assert!(bare.items.iter().all(|i| i.item_id.is_empty() && i.title.is_empty()));
    let pairs = |items: &[llamarec_proto::v1::RetrievedItem]| items.iter().map(|i| (i.item_index, i.score)).collect::<Vec<_>>();
    assert_eq!(pairs(&bare.items), pairs(&by_id.items));

    let status = client.retrieve(dense(indices.clone(), fingerprint ^ 1, true)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("is not this retriever's catalog"), "{}", status.message());
    let cases = [
        (dense(indices.clone(), 0, false), "need catalog_fingerprint"),
        (dense(Vec::new(), 0, true), "need catalog_fingerprint"),
        (dense(vec![indices[0], 0], fingerprint, true), "history_indices[1] is 0; it must be within 1..=1349"),
        (dense(vec![1350], fingerprint, true), "history_indices[0] is 1350"),
        (RetrieveRequest { history: ids, ..dense(indices, fingerprint, true) }, "either history or history_indices"),
    ];
    for (req, message) in cases {
        let status = client.retrieve(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(message), "{:?} does not contain {message:?}", status.message());
    }
}

#[tokio::test]
async fn retrieve_batch_answers_each_request_as_retrieve_would() {
    use llamarec_proto::v1::retrieve_result::Outcome;
    use llamarec_proto::v1::RetrieveBatchRequest;
    let (_process, mut client) = start().await;
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert!(info.max_batch >= 3, "Info advertises the batch limit: {}", info.max_batch);

    let history = user_history();
    let requests = vec![
        request(history.clone(), 20),
        request(history.clone(), 0),
        request(history[..5].to_vec(), 7),
        request(vec!["no-such-item".into()], 5),
        request(vec![], 3),
    ];
    let mut unary = Vec::new();
    for r in &requests {
        unary.push(client.retrieve(r.clone()).await);
    }
    let batch = client.retrieve_batch(RetrieveBatchRequest { requests: requests.clone() }).await.unwrap().into_inner();
    assert_eq!(batch.results.len(), requests.len());
    for (i, (result, unary)) in batch.results.iter().zip(unary).enumerate() {
        match (&result.outcome, unary) {
            (Some(Outcome::Response(b)), Ok(u)) => {
                let u = u.into_inner();
                let ids = |items: &[llamarec_proto::v1::RetrievedItem]| items.iter().map(|i| (i.item_id.clone(), i.score)).collect::<Vec<_>>();
                assert_eq!(ids(&b.items), ids(&u.items), "request {i}: the batch answered other candidates than Retrieve");
                assert_eq!(b.popularity_fallback, u.popularity_fallback, "request {i}");
            }
            (Some(Outcome::Error(e)), Err(status)) => {
                assert_eq!((e.code, e.message.as_str()), (status.code() as i32, status.message()), "request {i}");
            }
            (outcome, unary) => panic!("request {i}: batch {outcome:?} but Retrieve {unary:?}"),
        }
    }
    // The bad ones fail alone, and say why.
    let error = |i: usize| match &batch.results[i].outcome {
        Some(Outcome::Error(e)) => (Code::from_i32(e.code), e.message.clone()),
        other => panic!("request {i} should have failed: {other:?}"),
    };
    assert_eq!(error(1).0, Code::InvalidArgument);
    assert!(error(1).1.contains("k is 0"), "{}", error(1).1);
    assert!(error(3).1.contains("no-such-item"), "{}", error(3).1);

    for size in [0, info.max_batch as usize + 1] {
        let status = client.retrieve_batch(RetrieveBatchRequest { requests: vec![request(history.clone(), 5); size] }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "batch of {size}");
        assert!(status.message().contains("max_batch"), "{}", status.message());
    }
}
