//! The floor under a retriever-only Recommend: the cluster's two gRPC hops with no work behind
//! them. A "gateway" answers `Recommend` by sending one `Retrieve` to a "retriever" that returns
//! a fixed answer; both are plain tonic servers on a default multi-threaded tokio runtime, as the
//! real services are, with messages of the real sizes (105 history indices, the shipped
//! history's average; 20 candidates by index; 10 recommended items with ids and titles).
//! What the real gateway and retriever add (validation, history cache, LRURec scoring, metrics,
//! deadlines, auth) is absent, so CPU time per request measured on these two processes is what
//! tonic + HTTP/2 + the kernel cost on this machine before any of our code runs.
//!
//!   cargo run --release -p gateway --example grpc_floor -- retriever 127.0.0.1:50451
//!   cargo run --release -p gateway --example grpc_floor -- gateway 127.0.0.1:50450 127.0.0.1:50451
//!
//!   cargo run --release -p gateway --example grpc_floor -- probe 127.0.0.1:50451 127.0.0.1:50450 3000
//!
//! `deploy/local/grpc_floor.sh` starts both and drives them with `llamarec replay`. `probe`
//! sends one call at a time, alternating a Retrieve straight to the retriever (one hop) and a
//! Recommend through the gateway (two hops), and prints both latency distributions: the
//! gateway-overhead target's definition (p99 via the gateway − p99 of the backend alone) applied
//! to a gateway that does nothing.

use llamarec_proto::v1::gateway_server::{Gateway, GatewayServer};
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::retriever_server::{Retriever, RetrieverServer};
use llamarec_proto::v1::{
    AppendEventsRequest, AppendEventsResponse, GetHistoryRequest, RetrieveBatchRequest, RetrieveBatchResponse, GetHistoryResponse, InfoRequest, ModelVersion, RecommendRequest,
    RecommendResponse, RecommendedItem, RetrieveRequest, RetrieveResponse, RetrievedItem, RetrieverInfo, StageTimings,
};
use llamarec_common::serving::nodelay_incoming;
use std::time::Instant;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

const HISTORY_LEN: u32 = 105;
const CANDIDATES: u32 = 20;
const FINGERPRINT: u64 = 0x5eed;

struct FixedRetriever;

#[tonic::async_trait]
impl Retriever for FixedRetriever {
    async fn retrieve(&self, request: Request<RetrieveRequest>) -> Result<Response<RetrieveResponse>, Status> {
        let req = request.into_inner();
        // Only what any retriever must look at: the request's k.
        let items = (0..req.k.min(CANDIDATES)).map(|i| RetrievedItem { item_index: 1 + i, score: 10.0 - i as f32, ..Default::default() }).collect();
        Ok(Response::new(RetrieveResponse { items, model: Some(ModelVersion::default()), ..Default::default() }))
    }

    async fn retrieve_batch(&self, _: Request<RetrieveBatchRequest>) -> Result<Response<RetrieveBatchResponse>, Status> {
        Err(Status::unimplemented("the floor measures one Retrieve per Recommend"))
    }

    async fn reload(&self, _: Request<llamarec_proto::v1::ReloadRequest>) -> Result<Response<llamarec_proto::v1::ReloadResponse>, Status> {
        Err(Status::unimplemented("no models to reload here"))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<RetrieverInfo>, Status> {
        Ok(Response::new(RetrieverInfo { catalog_fingerprint: FINGERPRINT, ..Default::default() }))
    }
}

struct PassThroughGateway {
    retriever: RetrieverClient<Channel>,
    history: Vec<u32>,
    /// (id, title) per item index, as the real gateway's catalog resolves candidates.
    catalog: Vec<(String, String)>,
}

#[tonic::async_trait]
impl Gateway for PassThroughGateway {
    async fn recommend(&self, request: Request<RecommendRequest>) -> Result<Response<RecommendResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        let retrieve = RetrieveRequest {
            history_indices: self.history.clone(),
            k: CANDIDATES,
            exclude_history: true,
            indices_only: true,
            catalog_fingerprint: FINGERPRINT,
            ..Default::default()
        };
        let answer = self.retriever.clone().retrieve(retrieve).await?.into_inner();
        let items = answer
            .items
            .iter()
            .take(req.k as usize)
            .enumerate()
            .map(|(rank, c)| {
                let (id, title) = &self.catalog[c.item_index as usize];
                RecommendedItem {
                    item_id: id.clone(),
                    title: title.clone(),
                    final_score: c.score,
                    retriever_score: c.score,
                    retriever_rank: rank as u32 + 1,
                    ..Default::default()
                }
            })
            .collect();
        let total_us = start.elapsed().as_micros() as u64;
        Ok(Response::new(RecommendResponse {
            items,
            retriever_model: answer.model,
            timings: Some(StageTimings { total_us, ..Default::default() }),
            request_id: format!("{:016x}", total_us),
            history_length: HISTORY_LEN,
            ..Default::default()
        }))
    }

    async fn append_events(&self, _: Request<AppendEventsRequest>) -> Result<Response<AppendEventsResponse>, Status> {
        Err(Status::unimplemented("the floor gateway only answers Recommend"))
    }

    async fn get_history(&self, _: Request<GetHistoryRequest>) -> Result<Response<GetHistoryResponse>, Status> {
        Err(Status::unimplemented("the floor gateway only answers Recommend"))
    }

    async fn get_split(&self, _: Request<llamarec_proto::v1::GetSplitRequest>) -> Result<Response<llamarec_proto::v1::GetSplitResponse>, Status> {
        Err(Status::unimplemented("the floor gateway only answers Recommend"))
    }

    async fn set_split(&self, _: Request<llamarec_proto::v1::SetSplitRequest>) -> Result<Response<llamarec_proto::v1::SetSplitResponse>, Status> {
        Err(Status::unimplemented("the floor gateway only answers Recommend"))
    }
}

async fn probe(retriever: &str, gateway: &str, n: usize) -> anyhow::Result<()> {
    use llamarec_proto::v1::gateway_client::GatewayClient;
    let connect = |addr: &str| Endpoint::from_shared(format!("http://{addr}")).map(|e| e.tcp_nodelay(true).connect_lazy());
    let mut direct = RetrieverClient::new(connect(retriever)?);
    let mut via = GatewayClient::new(connect(gateway)?);
    let (mut one_hop, mut two_hops) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let retrieve = RetrieveRequest { history_indices: (1..=HISTORY_LEN).collect(), k: CANDIDATES, exclude_history: true, indices_only: true, catalog_fingerprint: FINGERPRINT, ..Default::default() };
    let recommend = RecommendRequest { user_id: "1".into(), k: 10, ..Default::default() };
    for i in 0..n + 200 {
        let t = Instant::now();
        direct.retrieve(retrieve.clone()).await?;
        let a = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        via.recommend(recommend.clone()).await?;
        let b = t.elapsed().as_micros() as u64;
        if i >= 200 {
            // the first 200 pairs warm up connections and code paths
            one_hop.push(a.max(1));
            two_hops.push(b.max(1));
        }
    }
    one_hop.sort_unstable();
    two_hops.sort_unstable();
    // The q-quantile: the smallest latency with a share q of the calls at or below it (exact, no buckets).
    let ms = |sorted: &[u64], q: f64| match sorted.len() {
        0 => 0.0,
        len => sorted[((q * len as f64).ceil() as usize).clamp(1, len) - 1] as f64 / 1000.0,
    };
    println!(
        "{{\"calls\": {n}, \"retrieve_direct_ms\": {{\"p50\": {:.3}, \"p99\": {:.3}}}, \"recommend_via_gateway_ms\": {{\"p50\": {:.3}, \"p99\": {:.3}}}, \"overhead_p50_ms\": {:.3}, \"overhead_p99_ms\": {:.3}}}",
        ms(&one_hop, 0.5),
        ms(&one_hop, 0.99),
        ms(&two_hops, 0.5),
        ms(&two_hops, 0.99),
        ms(&two_hops, 0.5) - ms(&one_hop, 0.5),
        ms(&two_hops, 0.99) - ms(&one_hop, 0.99)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["retriever", listen] => {
            Server::builder().add_service(RetrieverServer::new(FixedRetriever)).serve_with_incoming(nodelay_incoming(tokio::net::TcpListener::bind(listen).await?)).await?;
        }
        ["gateway", listen, retriever] => {
            let channel = Endpoint::from_shared(format!("http://{retriever}"))?.tcp_nodelay(true).connect_lazy();
            let gateway = PassThroughGateway {
                retriever: RetrieverClient::new(channel),
                history: (1..=HISTORY_LEN).collect(),
                catalog: (0..=CANDIDATES).map(|i| (format!("{}", 100 + i), format!("A Movie Title of Typical Length ({})", 1990 + i))).collect(),
            };
            Server::builder().add_service(GatewayServer::new(gateway)).serve_with_incoming(nodelay_incoming(tokio::net::TcpListener::bind(listen).await?)).await?;
        }
        ["probe", retriever, gateway, n] => probe(retriever, gateway, n.parse()?).await?,
        _ => anyhow::bail!("usage: grpc_floor retriever LISTEN | grpc_floor gateway LISTEN RETRIEVER | grpc_floor probe RETRIEVER GATEWAY N"),
    }
    Ok(())
}
