//! VM pools and placement: per-image pools of free VMs, VMs being made for
//! jobs (and handed over when another comes free first), the VM count
//! against `max_vms`, and returning, topping up and destroying VMs.

use super::worker::{Step, SystemFailure};
use super::{call, EngineError, Inner, State};
use crate::model::{Job, JobId, Machine};
use crate::vmms::{Vmms, VmmsError};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::{debug, warn, Instrument};

#[derive(Debug, Default)]
pub(super) struct Pool {
    pub(super) vmms: String,
    /// Size set by `prealloc`; 0 for pools made on demand.
    pub(super) target: usize,
    pub(super) cores: Option<u32>,
    pub(super) memory_mb: Option<u64>,
    pub(super) free: VecDeque<Machine>,
    /// Ids of every VM of the pool that exists (free or busy).
    pub(super) all: BTreeSet<u64>,
    pub(super) creating: usize,
    /// Workers whose job waits for a fresh VM being made, oldest first: a
    /// VM of the pool that comes free meanwhile goes to the first of them
    /// (see [`Pool::offer`]).
    pub(super) waiting: VecDeque<Waiter>,
    /// VMs of the pool being made for jobs, by VM id (see
    /// `Inner::fresh_or_freed_vm`).
    pub(super) making: HashMap<u64, Making>,
}

/// A VM being made for a job.
#[derive(Debug)]
pub(super) struct Making {
    vmms: String,
    /// The worker waiting for it; `None` once that worker's job took
    /// another VM: the next job of the image that needs a new VM waits for
    /// this one instead of making another.
    owner: Option<oneshot::Sender<Made>>,
}

/// A VM that was being made, and whether it was made (else the step that
/// failed).
type Made = (Machine, Result<(), (Step, EngineError)>);

/// A worker waiting for its job's fresh VM, which takes a VM of the same
/// backend that comes free first instead.
#[derive(Debug)]
pub(super) struct Waiter {
    job: JobId,
    vmms: String,
    handoff: oneshot::Sender<Machine>,
}

impl Pool {
    /// Gives a VM that is free now to the oldest worker still waiting for
    /// a fresh VM of this pool's image and its backend, or else keeps it
    /// free for the next job.
    fn offer(&mut self, mut vm: Machine) {
        while let Some(at) = self.waiting.iter().position(|w| w.vmms == vm.vmms) {
            let Some(waiter) = self.waiting.remove(at) else {
                break;
            };
            match waiter.handoff.send(vm) {
                Ok(()) => return,
                // That worker stopped waiting: the next one, if any.
                Err(unsent) => vm = unsent,
            }
        }
        self.free.push_back(vm);
    }
}

impl Inner {
    /// A VM being made for the job, or a VM of its pool that comes free
    /// while that one is being made, whichever is ready first: in a burst
    /// of jobs, a job need not wait for VMs made one after another
    /// (container starts wait their turn; an instance boots for a minute)
    /// while those of the jobs before it come free. The VM it waits for is
    /// one made for an earlier job that took another VM meanwhile, if there
    /// is one, else one made for it; a VM whose job took another joins the
    /// pool when it is ready.
    pub(super) async fn fresh_or_freed_vm(
        self: &Arc<Self>,
        job: &Job,
        backend: Arc<dyn Vmms>,
    ) -> Result<Machine, (Step, EngineError, Option<Machine>)> {
        let (owner, mut made) = oneshot::channel();
        let (handoff, mut freed) = oneshot::channel();
        let claimed = {
            let mut st = self.lock();
            let claimed = st.pools.get_mut(&job.image).and_then(|pool| {
                pool.waiting.push_back(Waiter {
                    job: job.id,
                    vmms: job.vmms.clone(),
                    handoff,
                });
                pool.making
                    .iter_mut()
                    .find(|(_, m)| m.owner.is_none() && m.vmms == job.vmms)
                    .map(|(&id, making)| (id, making))
            });
            match claimed {
                Some((id, making)) => {
                    making.owner = Some(owner);
                    // That VM has its slot: the one counted for this job
                    // is given back.
                    st.vm_count = st.vm_count.saturating_sub(1);
                    Ok(id)
                }
                None => Err(owner),
            }
        };
        let waited_for = match claimed {
            Ok(id) => id,
            Err(owner) => {
                let vm =
                    match self.new_machine(&job.image, &job.vmms, job.cores, job.memory_mb, true) {
                        Ok(vm) => vm,
                        Err(e) => {
                            self.stop_waiting(&job.image, job.id, &mut freed);
                            return Err((Step::Initialize, e, None));
                        }
                    };
                if let Some(pool) = self.lock().pools.get_mut(&vm.image) {
                    pool.making.insert(
                        vm.id,
                        Making {
                            vmms: vm.vmms.clone(),
                            owner: Some(owner),
                        },
                    );
                }
                self.clone().spawn_maker(vm.clone(), backend);
                vm.id
            }
        };
        tokio::select! {
            result = &mut made => {
                self.stop_waiting(&job.image, job.id, &mut freed);
                match result {
                    Ok((vm, Ok(()))) => Ok(vm),
                    Ok((vm, Err((step, e)))) => Err((step, e, Some(vm))),
                    Err(_) => {
                        let stopped = VmmsError::Backend("the task making the VM stopped".into());
                        Err((Step::Initialize, stopped.into(), None))
                    }
                }
            }
            Ok(taken) = &mut freed => {
                debug!(vm = %taken.name, "took a VM that came free before VM {waited_for} was made");
                let sent = {
                    let mut st = self.lock();
                    let making = st
                        .pools
                        .get_mut(&job.image)
                        .and_then(|pool| pool.making.get_mut(&waited_for));
                    match making {
                        // Still being made: for the next job that needs one.
                        Some(making) => {
                            making.owner = None;
                            None
                        }
                        // Made and sent here already, or being sent (then
                        // the maker finds this end gone and keeps it).
                        None => made.try_recv().ok(),
                    }
                };
                if let Some((vm, result)) = sent {
                    self.adopt_made_vm(vm, result).await;
                }
                Ok(taken)
            }
        }
    }

    /// Makes a VM for a worker waiting for it ([`Pool::making`]) and hands
    /// it to the worker that owns it when it is ready, or to the pool.
    fn spawn_maker(self: Arc<Self>, vm: Machine, backend: Arc<dyn Vmms>) {
        let maker = self.clone();
        self.workers.spawn(
            async move {
                let mut vm = vm;
                let result = tokio::select! {
                    result = maker.make_vm(backend.as_ref(), &mut vm) => result,
                    () = maker.abandon.cancelled() => {
                        // As for a job's VM: stopped where it is, and gone.
                        maker.destroy(&vm).await;
                        return;
                    }
                };
                let owner = maker
                    .lock()
                    .pools
                    .get_mut(&vm.image)
                    .and_then(|pool| pool.making.remove(&vm.id))
                    .and_then(|m| m.owner);
                let unsent = match owner {
                    Some(owner) => owner.send((vm, result)).err(),
                    None => Some((vm, result)),
                };
                if let Some((vm, result)) = unsent {
                    maker.adopt_made_vm(vm, result).await;
                }
            }
            .in_current_span(),
        );
    }

    /// Takes the job's worker off its pool's waiting list; a VM handed to
    /// it before that goes to the next one.
    fn stop_waiting(&self, image: &str, job: JobId, freed: &mut oneshot::Receiver<Machine>) {
        if let Some(pool) = self.lock().pools.get_mut(image) {
            pool.waiting.retain(|w| w.job != job);
        }
        freed.close();
        if let Ok(handed) = freed.try_recv() {
            self.offer_free(handed);
        }
    }

    /// A VM that is free now goes to a waiting worker or its pool's free
    /// VMs, and the dispatcher looks for a job for it.
    fn offer_free(&self, vm: Machine) {
        if let Some(pool) = self.lock().pools.get_mut(&vm.image) {
            pool.offer(vm);
        }
        self.dispatch_wake.notify_one();
    }

    /// A VM made for a job that took another one meanwhile: it joins the
    /// pool, unless it could not be made or the server is stopping.
    async fn adopt_made_vm(self: &Arc<Self>, vm: Machine, made: Result<(), (Step, EngineError)>) {
        match made {
            Ok(()) if !self.stop.is_cancelled() => self.offer_free(vm),
            Ok(()) => self.release_vm(vm, false).await,
            Err((step, e)) => {
                let failure = SystemFailure {
                    step,
                    unavailable: matches!(e, EngineError::Vmms(VmmsError::Unavailable(_))),
                    message: e.to_string(),
                    vm: None,
                };
                self.count_failure(&vm.vmms, &failure);
                warn!(vm = %vm.name, "cannot make a VM for the pool: {e}");
                self.release_vm(vm, false).await;
            }
        }
    }

    pub(super) fn new_machine(
        &self,
        image: &str,
        vmms: &str,
        cores: Option<u32>,
        memory_mb: Option<u64>,
        busy: bool,
    ) -> Result<Machine, EngineError> {
        let id = self.store.next_vm_id()?;
        let mut vm = Machine::new(&self.config.prefix, id, image, vmms);
        vm.cores = cores;
        vm.memory_mb = memory_mb;
        let mut st = self.lock();
        st.owned.insert(vm.name.clone());
        if busy {
            st.pools
                .entry(image.to_string())
                .or_insert_with(|| Pool {
                    vmms: vmms.to_string(),
                    ..Pool::default()
                })
                .all
                .insert(id);
        }
        Ok(vm)
    }

    /// A job's fresh VM could not even be named: give its slot back.
    pub(super) fn forget_unborn_vm(&self) {
        let mut st = self.lock();
        st.vm_count = st.vm_count.saturating_sub(1);
    }

    /// Whether the VM sits on a host that takes no new jobs (drained, or
    /// down): such a VM is not kept for reuse.
    fn on_closed_host(&self, vm: &Machine) -> bool {
        let Some(host) = vm.host.as_deref() else {
            return false;
        };
        self.backend(&vm.vmms).is_ok_and(|backend| {
            backend
                .hosts()
                .iter()
                .any(|h| h.name == host && (h.draining || !h.up))
        })
    }

    /// After a job: keep a healthy VM for the next job (reuse), or destroy it
    /// and top the pool up to its target.
    pub(super) async fn release_vm(self: &Arc<Self>, vm: Machine, healthy: bool) {
        // A VM in a job's own cloud account served that job only.
        let own_account = vm.credentials.is_some();
        if healthy && self.config.reuse_vms && !own_account && !self.on_closed_host(&vm) {
            let reset = match self.backend(&vm.vmms) {
                Ok(backend) => call(
                    self.timeout(self.config.timeouts.query_secs),
                    "resetting the VM",
                    backend.reset_vm(&vm),
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match reset {
                Ok(()) => {
                    self.offer_free(vm);
                    return;
                }
                Err(e) => {
                    self.metrics.backend_error(&vm.vmms, "reset");
                    warn!(vm = %vm.name, "cannot reset VM for reuse: {e}");
                }
            }
        }
        let image = vm.image.clone();
        {
            let mut st = self.lock();
            if let Some(pool) = st.pools.get_mut(&image) {
                pool.all.remove(&vm.id);
            }
        }
        self.clone().spawn_destroy(vm);
        let on_demand = self.lock().pools.get(&image).is_some_and(|p| p.target == 0);
        if on_demand && healthy && !self.config.reuse_vms && !own_account {
            // Without reuse, a fresh VM for the next job of this image is
            // made now, off the next job's critical path.
            {
                let mut st = self.lock();
                if let Some(pool) = st.pools.get_mut(&image) {
                    pool.creating += 1;
                }
                st.vm_count += 1;
            }
            self.clone().spawn_pool_vm(image);
        } else {
            self.top_up(&image);
        }
    }

    /// Starts creating VMs until the pool of `image` reaches its target.
    fn top_up(self: &Arc<Self>, image: &str) {
        let missing = {
            let mut st = self.lock();
            let Some(pool) = st.pools.get_mut(image) else {
                return;
            };
            let missing = pool.target.saturating_sub(pool.all.len() + pool.creating);
            pool.creating += missing;
            st.vm_count += missing;
            missing
        };
        for _ in 0..missing {
            self.clone().spawn_pool_vm(image.to_string());
        }
    }

    /// Creates one free VM for the pool of `image` (slot already counted).
    pub(super) fn spawn_pool_vm(self: Arc<Self>, image: String) {
        let inner = self.clone();
        inner.workers.spawn(async move {
            let (vmms, cores, memory_mb) = {
                let st = self.lock();
                match st.pools.get(&image) {
                    Some(p) => (p.vmms.clone(), p.cores, p.memory_mb),
                    None => return,
                }
            };
            let created = async {
                let backend = self.backend(&vmms)?;
                let mut vm = self.new_machine(&image, &vmms, cores, memory_mb, false)?;
                match self.make_vm(backend.as_ref(), &mut vm).await {
                    Ok(()) => Ok(vm),
                    Err((_, e)) => {
                        // The slot is given back below, not by the destroyer.
                        self.clone().spawn_destroy_keep_count(vm);
                        Err(e)
                    }
                }
            }
            .await;
            let stopping = self.stop.is_cancelled();
            let unused = {
                let mut st = self.lock();
                let pool = st.pools.entry(image.clone()).or_default();
                pool.creating = pool.creating.saturating_sub(1);
                match created {
                    Ok(vm) if !stopping => {
                        pool.all.insert(vm.id);
                        pool.offer(vm);
                        None
                    }
                    other => Some(other),
                }
            };
            match unused {
                None => self.dispatch_wake.notify_one(),
                // Made while stopping: nothing will use it.
                Some(Ok(vm)) => self.clone().spawn_destroy(vm),
                Some(Err(e)) => {
                    {
                        let mut st = self.lock();
                        st.vm_count = st.vm_count.saturating_sub(1);
                    }
                    if matches!(e, EngineError::Timeout(_)) {
                        self.counters
                            .waitvm_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.metrics.backend_error(&vmms, "initialize");
                    warn!(image = %image, "cannot create a pool VM: {e}");
                }
            }
        });
    }

    /// Destroys a VM in the background; its slot is freed when it is gone.
    pub(super) fn spawn_destroy(self: Arc<Self>, vm: Machine) {
        let inner = self.clone();
        inner.workers.spawn(async move {
            self.destroy(&vm).await;
            let mut st = self.lock();
            st.vm_count = st.vm_count.saturating_sub(1);
            drop(st);
            self.dispatch_wake.notify_one();
        });
    }

    /// Destroys a VM whose slot was handed to another job already.
    pub(super) fn spawn_destroy_keep_count(self: Arc<Self>, vm: Machine) {
        let inner = self.clone();
        inner.workers.spawn(async move { self.destroy(&vm).await });
    }

    pub(super) async fn destroy(&self, vm: &Machine) {
        let result = match self.backend(&vm.vmms) {
            Ok(backend) => {
                call(
                    self.timeout(self.config.timeouts.destroy_secs),
                    "destroying the VM",
                    backend.safe_destroy_vm(vm),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            // Still owned when destruction failed: the sweeper retries it
            // only once it is no longer owned, so release ownership now.
            Ok(()) => debug!(vm = %vm.name, "VM destroyed"),
            Err(e) => {
                self.metrics.backend_error(&vm.vmms, "destroy");
                warn!(vm = %vm.name, "cannot destroy VM (the orphan sweep will retry): {e}");
            }
        }
        self.lock().owned.remove(&vm.name);
    }
}

/// Takes a free VM out of its pool (beyond that pool's target) so its slot
/// can serve a waiting job. Any free VM will do, of the job's image too:
/// when this is called none can run the job (another image or backend, or
/// the server's account for a job with its own keys).
pub(super) fn evict_idle(st: &mut State) -> Option<Machine> {
    let (image, _) = st
        .pools
        .iter()
        .filter(|(_, pool)| !pool.free.is_empty() && pool.all.len() > pool.target)
        .max_by_key(|(_, pool)| pool.free.len())?;
    let image = image.clone();
    let pool = st.pools.get_mut(&image)?;
    let vm = pool.free.pop_front()?;
    pool.all.remove(&vm.id);
    Some(vm)
}

/// Takes every idle VM that sits on `host` out of the pools (a drained
/// host keeps only its busy VMs).
pub(super) fn take_idle_on_host(st: &mut State, host: &str) -> Vec<Machine> {
    let mut taken = Vec::new();
    for pool in st.pools.values_mut() {
        let (on_host, rest): (VecDeque<Machine>, VecDeque<Machine>) = pool
            .free
            .drain(..)
            .partition(|vm| vm.host.as_deref() == Some(host));
        pool.free = rest;
        for vm in on_host {
            pool.all.remove(&vm.id);
            taken.push(vm);
        }
    }
    taken
}

#[cfg(test)]
#[path = "pools_tests.rs"]
mod tests;
