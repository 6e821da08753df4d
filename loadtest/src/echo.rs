//! A trivial Switchyard endpoint (`serve-echo`): answers every Generate at once with
//! `max_tokens` tokens (at most `--tokens`), no model. It measures the load tester itself:
//! how many streams per second one process can drive before its schedule lag grows.

use std::pin::Pin;
use switchyard_proto::v1::inference_server::{Inference, InferenceServer};
use switchyard_proto::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct Echo {
    pub max_tokens: u32,
    pub vocab: u32,
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for Echo {
    type GenerateStream = GenStream;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let r = req.into_inner();
        let prompt = match &r.input {
            Some(generate_request::Input::TokenIds(t)) => t.ids.len() as u32,
            Some(generate_request::Input::Text(t)) => t.split_whitespace().count() as u32,
            Some(generate_request::Input::Chat(c)) => c
                .messages
                .iter()
                .map(|m| m.content.split_whitespace().count() as u32)
                .sum(),
            None => return Err(Status::invalid_argument("input is required")),
        };
        let n = r.max_tokens.clamp(1, self.max_tokens);
        let mut msgs = vec![Ok(GenerateResponse {
            event: Some(generate_response::Event::Started(Started {
                request_id: r.request_id.clone(),
                prompt_tokens: prompt,
                resumed_after: 0,
            })),
        })];
        for i in 0..n {
            msgs.push(Ok(GenerateResponse {
                event: Some(generate_response::Event::Delta(Delta {
                    text: "x".into(),
                    token_ids: vec![i % self.vocab],
                    completion_tokens: i + 1,
                    ..Default::default()
                })),
            }));
        }
        msgs.push(Ok(GenerateResponse {
            event: Some(generate_response::Event::Finished(Finished {
                reason: FinishReason::Length as i32,
                usage: Some(Usage {
                    prompt_tokens: prompt,
                    reasoning_tokens: 0,
                    completion_tokens: n,
                }),
                ..Default::default()
            })),
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    type ResumeStream = GenStream;

    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<GenStream>, Status> {
        Err(Status::unimplemented(
            "the echo endpoint has nothing to resume: it answers every Generate at once",
        ))
    }

    async fn tokenize(
        &self,
        _: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Err(Status::unimplemented("the echo endpoint has no tokenizer"))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse {
            models: vec![ModelInfo {
                name: "echo".into(),
                architecture: "echo".into(),
                max_context: 4096,
                vocab_size: self.vocab,
                ..Default::default()
            }],
        }))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("the echo endpoint has no cluster"))
    }
}

/// Serves until the process ends; prints `serving grpc=URL` once listening.
pub async fn serve(listen: &str, echo: Echo) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("serving grpc=http://{}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(InferenceServer::new(echo))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
