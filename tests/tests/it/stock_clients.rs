//! What stock gRPC clients find on the coordinator: health checking, and reflection in both
//! versions (grpcurl speaks v1, Python's grpcio-reflection v1alpha).

use coordinator::identity::Role;
use tests::federation::Federation;

type R = anyhow::Result<()>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checking_and_reflection_in_both_versions() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    let conn = fed.conn(Role::Admin, "lead");
    let read = |f: &str| std::fs::read(conn.bundle.join(f));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")?))
        .identity(tonic::transport::Identity::from_pem(read("cert.pem")?, read("key.pem")?))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(conn.coordinator.clone())?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["fedtune.v1.SiteService", "fedtune.v1.AdminService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await?
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    // Reflection in both versions a stock client may speak: grpcurl v1, Python's
    // grpcio-reflection v1alpha.
    use tonic_reflection::pb::{v1, v1alpha};
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let ask = v1alpha::ServerReflectionRequest {
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut answers = alpha.server_reflection_info(tokio_stream::iter([ask])).await?.into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await?.and_then(|a| a.message_response)
    else {
        anyhow::bail!("v1alpha reflection did not list services");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"fedtune.v1.AdminService"), "{names:?}");
    let mut one = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let ask = v1::ServerReflectionRequest {
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut answers = one.server_reflection_info(tokio_stream::iter([ask])).await?.into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await?.and_then(|a| a.message_response)
    else {
        anyhow::bail!("v1 reflection did not list services");
    };
    assert!(list.service.iter().any(|s| s.name == "fedtune.v1.SiteService"));
    fed.shutdown().await
}
