//! Instances through the EC2 API: launching one (spot or on demand) with
//! the VM's tags, finding a VM's instances and their address, terminating
//! them (and waiting for `terminated`), listing the VMs of a prefix.

use super::api::{self, TAG_IMAGE, TAG_PREFIX, TAG_VM, TAG_VM_ID};
use super::Ec2;
use aws_sdk_ec2::types::{
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use tango_core::model::{CloudCredentials, Machine};
use tango_core::vmms::VmmsError;
use tokio::time::Instant;

/// The prefix part of `<prefix>-<id>-<image>`.
fn machine_prefix(vm: &Machine) -> Option<&str> {
    vm.name
        .strip_suffix(&format!("-{}-{}", vm.id, vm.image))
        .filter(|prefix| !prefix.is_empty())
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Ec2 {
    /// One cheap API call with the server's credentials: fails when the
    /// endpoint, region or credentials are wrong.
    pub async fn check(&self) -> Result<(), VmmsError> {
        self.clients
            .server()
            .describe_instances()
            .max_results(5)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api::sdk_error(&self.clients.endpoint, "cannot list instances", e))
    }

    /// Every instance of `prefix` in the account of `credentials` (the
    /// server's for `None`), terminated ones included: id, VM name, state.
    pub async fn instances(
        &self,
        prefix: &str,
        credentials: Option<&CloudCredentials>,
    ) -> Result<Vec<(String, String, String)>, VmmsError> {
        let client = self.clients.for_credentials(credentials);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![api::tag_filter(TAG_PREFIX, prefix)],
                vec![],
            ))
            .await?;
        Ok(found
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    api::tag(i, TAG_VM).unwrap_or_default().to_string(),
                    api::state(i).map(|s| s.as_str()).unwrap_or("").to_string(),
                )
            })
            .collect())
    }

    fn client(&self, vm: &Machine) -> aws_sdk_ec2::Client {
        self.clients.for_credentials(vm.credentials.as_ref())
    }

    /// An API future bounded by the API timeout (the SDK bounds each
    /// request; this bounds paging and retries together).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, VmmsError>>,
    ) -> Result<T, VmmsError> {
        let limit = self.config.api_timeout * 3;
        tokio::time::timeout(limit, call).await.map_err(|_| {
            VmmsError::Backend(format!(
                "ec2: the EC2 API at {} did not answer within {limit:?}",
                self.clients.endpoint
            ))
        })?
    }

    /// The VM's instances that are not terminated (normally one): the one
    /// this process launched, or those carrying its name tag.
    pub(super) async fn instance_ids(
        &self,
        vm: &Machine,
        states: &[&str],
    ) -> Result<Vec<String>, VmmsError> {
        let client = self.client(vm);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![api::tag_filter(TAG_VM, &vm.name), api::state_filter(states)],
                vec![],
            ))
            .await?;
        let mut ids: Vec<String> = found
            .iter()
            .filter_map(|i| i.instance_id().map(String::from))
            .collect();
        // A just launched instance may not show in filtered lists yet.
        if let Some(known) = self.with_state(&vm.name, |s| s.instance_id.clone()) {
            if !ids.contains(&known) {
                ids.push(known);
            }
        }
        Ok(ids)
    }

    async fn launch(
        &self,
        vm: &Machine,
        ami: &str,
        prefix: &str,
        spot: bool,
    ) -> Result<String, VmmsError> {
        let tags = [
            ("Name", vm.name.clone()),
            (TAG_PREFIX, prefix.to_string()),
            (TAG_VM, vm.name.clone()),
            (TAG_VM_ID, vm.id.to_string()),
            (TAG_IMAGE, vm.image.clone()),
        ]
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
        let market = spot.then(|| {
            InstanceMarketOptionsRequest::builder()
                .market_type(MarketType::Spot)
                .spot_options(
                    SpotMarketOptions::builder()
                        .spot_instance_type(SpotInstanceType::OneTime)
                        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                        .build(),
                )
                .build()
        });
        let token = format!(
            "{:016x}-{}-{}",
            fnv1a(vm.name.as_bytes()),
            self.nonce,
            if spot { "s" } else { "o" }
        );
        let launched = self
            .client(vm)
            .run_instances()
            .image_id(ami)
            .instance_type(InstanceType::from(self.config.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_security_group_ids(
                (!self.config.security_group_ids.is_empty())
                    .then(|| self.config.security_group_ids.clone()),
            )
            .set_key_name(self.config.key_name.clone())
            .set_subnet_id(self.config.subnet_id.clone())
            .set_instance_market_options(market)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags))
                    .build(),
            )
            .client_token(token.chars().take(64).collect::<String>())
            .send();
        let output = self
            .bounded(async {
                launched.await.map_err(|e| {
                    api::sdk_error(
                        &self.clients.endpoint,
                        &format!("cannot launch an instance of {ami} for {}", vm.name),
                        e,
                    )
                })
            })
            .await?;
        output
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(String::from)
            .ok_or_else(|| VmmsError::Backend("ec2: RunInstances returned no instance".into()))
    }

    /// Sends terminate for the VM's instances; which ones (none: nothing
    /// was left of the VM).
    pub(super) async fn terminate(&self, vm: &Machine) -> Result<Vec<String>, VmmsError> {
        let mut live = api::LIVE_STATES.to_vec();
        live.push("shutting-down");
        let ids = self.instance_ids(vm, &live).await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        let sent = self
            .client(vm)
            .terminate_instances()
            .set_instance_ids(Some(ids.clone()))
            .send();
        let result = self
            .bounded(async {
                match sent.await {
                    Ok(_) => Ok(()),
                    Err(e) if api::is_instance_not_found(&e) => Ok(()),
                    Err(e) => Err(api::sdk_error(
                        &self.clients.endpoint,
                        &format!("cannot terminate {} ({})", vm.name, ids.join(", ")),
                        e,
                    )),
                }
            })
            .await;
        if result.is_ok() {
            self.forget_vm(&vm.name).await;
        }
        result.map(|()| ids)
    }

    /// The address SSH goes to, once the instance runs; `None` while it is
    /// still pending.
    pub(super) async fn running_address(
        &self,
        vm: &Machine,
        id: &str,
    ) -> Result<Option<String>, VmmsError> {
        let client = self.client(vm);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![],
                vec![id.to_string()],
            ))
            .await?;
        // Right after RunInstances EC2 may not know the id yet.
        let Some(instance) = found.first() else {
            return Ok(None);
        };
        match api::state(instance) {
            Some(InstanceStateName::Running) => {}
            Some(InstanceStateName::Pending) | None => return Ok(None),
            Some(other) => {
                let reason = instance
                    .state_reason()
                    .and_then(|r| r.message())
                    .unwrap_or("no reason given");
                return Err(VmmsError::Backend(format!(
                    "ec2: instance {id} of {} is {} ({reason})",
                    vm.name,
                    other.as_str()
                )));
            }
        }
        if let Some(host) = &self.config.ssh_host_override {
            return Ok(Some(host.clone()));
        }
        let address = if self.config.use_public_ip {
            instance.public_ip_address()
        } else {
            instance.private_ip_address()
        };
        address.map(|a| Some(a.to_string())).ok_or_else(|| {
            VmmsError::Backend(format!(
                "ec2: instance {id} has no {} IP address; check use_public_ip and the subnet",
                if self.config.use_public_ip {
                    "public"
                } else {
                    "private"
                }
            ))
        })
    }

    pub(super) async fn launch_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let ami = self
            .config
            .images
            .get(&vm.image)
            .ok_or_else(|| VmmsError::NoSuchImage(vm.image.clone()))?;
        let prefix = machine_prefix(vm).ok_or_else(|| {
            VmmsError::Backend(format!(
                "VM name {:?} does not follow <prefix>-<id>-<image>",
                vm.name
            ))
        })?;
        self.forget_vm(&vm.name).await;
        let mut launched = None;
        if self.config.spot {
            match self.launch(vm, ami, prefix, true).await {
                Ok(id) => launched = Some(id),
                Err(e @ VmmsError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(vm = %vm.name, "no spot instance, launching on demand: {e}")
                }
            }
        }
        let id = match launched {
            Some(id) => id,
            None => self.launch(vm, ami, prefix, false).await?,
        };
        tracing::info!(vm = %vm.name, instance = %id, "launched an instance");
        self.with_state(&vm.name, |s| s.instance_id = Some(id));
        Ok(())
    }

    pub(super) async fn terminate_confirmed(&self, vm: &Machine) -> Result<(), VmmsError> {
        let ids = self.terminate(vm).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.terminate_wait;
        let client = self.client(vm);
        loop {
            let found = self
                .bounded(api::describe(
                    &client,
                    &self.clients.endpoint,
                    vec![],
                    ids.clone(),
                ))
                .await?;
            let left: Vec<String> = found
                .iter()
                .filter(|i| api::state(i) != Some(&InstanceStateName::Terminated))
                .map(|i| {
                    format!(
                        "{} ({})",
                        i.instance_id().unwrap_or_default(),
                        api::state(i).map(|s| s.as_str()).unwrap_or("unknown")
                    )
                })
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() + self.config.poll_interval >= deadline {
                return Err(VmmsError::Backend(format!(
                    "ec2: {} not terminated after {:?}: {}",
                    vm.name,
                    self.config.terminate_wait,
                    left.join(", ")
                )));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    pub(super) async fn list_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let found = self
            .bounded(api::describe(
                self.clients.server(),
                &self.clients.endpoint,
                vec![
                    api::tag_filter(TAG_PREFIX, prefix),
                    api::state_filter(&api::LIVE_STATES),
                ],
                vec![],
            ))
            .await?;
        let mut machines = Vec::new();
        for instance in &found {
            let (Some(name), Some(id), Some(image)) = (
                api::tag(instance, TAG_VM),
                api::tag(instance, TAG_VM_ID).and_then(|id| id.parse::<u64>().ok()),
                api::tag(instance, TAG_IMAGE),
            ) else {
                continue;
            };
            let mut machine = Machine::new(prefix, id, image, "ec2");
            if machine.name != name || api::tag(instance, TAG_PREFIX) != Some(prefix) {
                continue;
            }
            machine.name = name.to_string();
            if let Some(instance_id) = instance.instance_id() {
                self.with_state(name, |s| s.instance_id = Some(instance_id.to_string()));
            }
            machines.push(machine);
        }
        machines.sort_by_key(|m| m.id);
        machines.dedup_by(|a, b| a.name == b.name);
        Ok(machines)
    }

    pub(super) async fn instance_exists(&self, vm: &Machine) -> Result<bool, VmmsError> {
        let client = self.client(vm);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![
                    api::tag_filter(TAG_VM, &vm.name),
                    api::state_filter(&api::LIVE_STATES),
                ],
                vec![],
            ))
            .await?;
        Ok(!found.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_of_a_vm_name() {
        let vm = Machine::new("prod", 7, "course/img:v2", "ec2");
        assert_eq!(machine_prefix(&vm), Some("prod"));
    }
}
