//! Connections to the deployment under test: a fixed number of HTTP/2 channels opened before
//! the run (so a wrong address or certificate fails at once, not as a flood of errors), the
//! admin token attached to AdminService calls only, and a retry for set-up and verification
//! calls that must not be lost to a transient failure.

use std::{future::Future, time::Duration};

use anyhow::Context;
use tonic::{
    Request, Response, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt;

use super::{
    Options,
    stats::{Class, code_name},
};
use ecommerce::proto::admin_service_client::AdminServiceClient;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of a set-up or verification call whose outcome was unknown.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Adds `authorization: Bearer <token>`; without a token the call fails before it is sent,
/// saying how to give one.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(value) => {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
                Ok(request)
            }
            None => Err(Status::unauthenticated(
                "no admin token: pass --admin-token or set ADMIN_TOKEN",
            )),
        }
    }
}

pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;

pub struct Connections {
    channels: Vec<Channel>,
    bearer: Bearer,
}

impl Connections {
    pub async fn open(options: &Options) -> anyhow::Result<Self> {
        let bearer = Bearer(
            options
                .admin_token
                .as_deref()
                .map(|token| format!("Bearer {token}").parse())
                .transpose()
                .context("the admin token must be printable ASCII")?,
        );
        let mut endpoint = Endpoint::from_shared(options.target.clone())
            .with_context(|| format!("invalid target `{}`", options.target))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(options.timeout)
            .tcp_nodelay(true);
        let tls = options.tls.clone().or_else(|| {
            options
                .target
                .starts_with("https://")
                .then(Default::default)
        });
        if let Some(tls) = tls {
            let mut config = ClientTlsConfig::new().with_enabled_roots();
            if let Some(pem) = &tls.ca_cert_pem {
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .context("invalid TLS settings")?;
        }
        let connections = options.connections();
        let channels = futures::future::try_join_all((0..connections).map(|_| endpoint.connect()))
            .await
            .with_context(|| format!("cannot connect to {}", options.target))?;
        Ok(Self { channels, bearer })
    }

    /// Channel `i`, round robin over the connections.
    pub fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    pub fn admin(&self) -> AdminClient {
        self.admin_on(0)
    }

    /// An admin client on channel `i`.
    pub fn admin_on(&self, i: usize) -> AdminClient {
        AdminServiceClient::with_interceptor(self.channel(i), self.bearer.clone())
    }
}

/// `UNAVAILABLE: message` or `RESOURCE_EXHAUSTED/COUPON_SOLD_OUT: message`.
pub fn describe(status: &Status) -> String {
    let code = code_name(status.code());
    match status.get_details_error_info() {
        Some(info) => format!("{code}/{}: {}", info.reason, status.message()),
        None => format!("{code}: {}", status.message()),
    }
}

/// Calls until an answer that is not of unknown outcome, up to [`ATTEMPTS`] times with
/// exponential backoff. Only for calls that are safe to repeat (reads, keyed charges, fixture
/// creation, where a spare fixture is harmless).
pub async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if Class::of(status.code()) == Class::Indeterminate && attempt < ATTEMPTS =>
            {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}
