//! The EC2 control plane: clients (the server's and per-job ones), the
//! instances of a VM found by tag, and what an API failure means.

use super::Ec2Config;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, Instance, InstanceStateName};
use aws_sdk_ec2::Client;
use std::collections::HashMap;
use std::sync::Mutex;
use tango_core::model::CloudCredentials;
use tango_core::vmms::VmmsError;

/// Tag keys of the instances this backend launches.
pub const TAG_PREFIX: &str = "tango:prefix";
pub const TAG_VM: &str = "tango:vm";
pub const TAG_VM_ID: &str = "tango:vm-id";
pub const TAG_IMAGE: &str = "tango:image";

/// Instance states that still cost money or may yet run: everything but
/// `shutting-down` and `terminated`.
pub const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// The server's client and one client per job account (access key id).
pub struct Clients {
    base: SdkConfig,
    server: Client,
    /// By access key id: the secret it was built with, and the client.
    per_account: Mutex<HashMap<String, (String, Client)>>,
    /// Where requests go, for error messages.
    pub endpoint: String,
}

impl Clients {
    pub async fn new(config: &Ec2Config) -> Clients {
        // rustls with ring, as the rest of the workspace; the SDK's default
        // client would bring aws-lc-rs.
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.api_timeout.min(std::time::Duration::from_secs(10)))
            .operation_attempt_timeout(config.api_timeout)
            .operation_timeout(config.api_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http_client)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3));
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        // With static keys and a region the loader asks nothing of the
        // instance metadata service or the environment's credential chain.
        if let Some(keys) = &config.credentials {
            loader = loader.credentials_provider(static_credentials(keys));
        }
        let base = loader.load().await;
        let server = Client::new(&base);
        let endpoint = config
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://ec2.{}.amazonaws.com", config.region));
        Clients {
            base,
            server,
            per_account: Mutex::new(HashMap::new()),
            endpoint,
        }
    }

    /// The client for a VM: the job's account when it carries credentials,
    /// else the server's.
    pub fn for_credentials(&self, credentials: Option<&CloudCredentials>) -> Client {
        let Some(keys) = credentials else {
            return self.server.clone();
        };
        let mut cache = self.per_account.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((secret, client)) = cache.get(&keys.access_key_id) {
            if *secret == keys.secret_access_key {
                return client.clone();
            }
        }
        let config = aws_sdk_ec2::config::Builder::from(&self.base)
            .credentials_provider(static_credentials(keys))
            .build();
        let client = Client::from_conf(config);
        cache.insert(
            keys.access_key_id.clone(),
            (keys.secret_access_key.clone(), client.clone()),
        );
        client
    }

    pub fn server(&self) -> &Client {
        &self.server
    }
}

fn static_credentials(keys: &CloudCredentials) -> Credentials {
    Credentials::new(
        keys.access_key_id.clone(),
        keys.secret_access_key.clone(),
        None,
        None,
        "tango-rs",
    )
}

pub fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

pub fn state_filter(states: &[&str]) -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
        .build()
}

pub fn tag<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

pub fn state(instance: &Instance) -> Option<&InstanceStateName> {
    instance.state().and_then(|s| s.name())
}

/// Every instance matching `filters`, across pages.
pub async fn describe(
    client: &Client,
    endpoint: &str,
    filters: Vec<Filter>,
    instance_ids: Vec<String>,
) -> Result<Vec<Instance>, VmmsError> {
    let mut pages = client
        .describe_instances()
        .set_filters((!filters.is_empty()).then_some(filters))
        .set_instance_ids((!instance_ids.is_empty()).then_some(instance_ids))
        .into_paginator()
        .send();
    let mut instances = Vec::new();
    while let Some(page) = pages.next().await {
        match page {
            Ok(page) => instances.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances().iter().cloned()),
            ),
            Err(e) if is_instance_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(sdk_error(endpoint, "cannot describe instances", e)),
        }
    }
    Ok(instances)
}

/// The error says the instance id is unknown (or never was valid).
pub fn is_instance_not_found<E, R>(error: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(
        error.code(),
        Some("InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed")
    )
}

/// What to check for an error code of the EC2 API.
fn hint(code: &str) -> &'static str {
    match code {
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "OptInRequired"
        | "Blocked" => {
            "check the access key (the server's or the job's accessKeyId/accessKey) and its IAM permissions (ec2:RunInstances, DescribeInstances, TerminateInstances, CreateTags)"
        }
        c if c.starts_with("InvalidAMIID") => {
            "check the [ec2] images map: the AMI must exist in this region and account"
        }
        c if c.starts_with("InvalidGroup") || c.starts_with("InvalidSecurityGroup") => {
            "check security_group_ids (they must belong to the subnet's VPC)"
        }
        c if c.starts_with("InvalidKeyPair") => "check key_name: the key pair must exist in this region",
        c if c.starts_with("InvalidSubnet") => "check subnet_id",
        "InvalidParameterValue" | "InvalidParameterCombination" | "Unsupported" => {
            "check instance_type against the AMI's architecture and the subnet's availability zone"
        }
        "InsufficientInstanceCapacity"
        | "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "MaxSpotInstanceCountExceeded"
        | "SpotMaxPriceTooLow" => "no capacity or quota for this instance type now: try another type or zone, or raise the quota",
        "RequestLimitExceeded" | "Throttling" => "the API throttles this account: fewer VMs or pools",
        _ => "check the [ec2] settings (region, endpoint_url, images, instance_type, networking)",
    }
}

/// An SDK error as a VMMS error: an endpoint that cannot be reached makes
/// the backend unavailable (the engine waits instead of spending the job's
/// retries); anything else says what to check.
pub fn sdk_error<E, R>(endpoint: &str, context: &str, error: SdkError<E, R>) -> VmmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    if let SdkError::DispatchFailure(failure) = &error {
        if failure.is_io() || failure.is_timeout() {
            return VmmsError::Unavailable(format!(
                "ec2: {context}: cannot connect to the EC2 endpoint {endpoint}: {}; check endpoint_url and region, and that this host reaches it",
                DisplayErrorContext(&error)
            ));
        }
    }
    match error.code() {
        Some(code) => VmmsError::Backend(format!(
            "ec2: {context}: {code}: {}; {}",
            error.message().unwrap_or("no message"),
            hint(code)
        )),
        None => VmmsError::Backend(format!(
            "ec2: {context}: {}; check the [ec2] settings and the endpoint {endpoint}",
            DisplayErrorContext(&error)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_setting() {
        assert!(hint("InvalidAMIID.NotFound").contains("images"));
        assert!(hint("InvalidKeyPair.NotFound").contains("key_name"));
        assert!(hint("AuthFailure").contains("access key"));
        assert!(hint("Whatever").contains("[ec2] settings"));
    }
}
