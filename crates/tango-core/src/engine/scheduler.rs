//! Which queued job starts next: the scheduling policy, as a pure type.
//!
//! No I/O and no clock: jobs go in with [`Scheduler::push`], the dispatcher
//! asks [`Scheduler::next`] whenever a VM may be had, and tells
//! [`Scheduler::finished`] when a started job stops running.
//!
//! **Fair** (the default): the next job is chosen round-robin across the
//! courselabs with queued jobs, weighted by stride scheduling over VM time:
//! each courselab's turn comes as its share of the VM time used says (a
//! courselab of weight 3 gets three times the VM time of a weight-1
//! courselab while both have jobs waiting). A turn is counted in VM time,
//! not in jobs started, because courses differ: with turns counted in jobs,
//! a course of 2-minute jobs would hold 24 times the VMs of a course of
//! 5-second jobs and the big course's students would wait behind the small
//! one's. A start is charged the courselab's recent mean run time and
//! corrected to the real one when the job ends (at least 1 ms per job, so
//! equal jobs simply alternate). Within a courselab, by rounds across its
//! submitters: a submitter's job of round k (its k-th job started since it
//! last had nothing queued or running) never starts while another submitter of that
//! courselab has a queued job of an earlier round. Within a round, the
//! submitter with fewer jobs started lately in that courselab goes first
//! (remembered across the times it had nothing queued), so a student's
//! first submission of the evening is not behind another's tenth: this is
//! what cuts the wait for a first result at a deadline (see the README's
//! deadline simulator). Each submitter's jobs start oldest first; ties go
//! to the older job, so the order is deterministic. **Fifo**: oldest job first.
//!
//! A courselab at its `max_running` starts nothing until one of its jobs
//! ends.
//!
//! Jobs are kept apart by [`Class`] (the kind of VM they need), and the
//! dispatcher says which classes can start now (a free VM of the image, or
//! room for a new VM). `next` looks at the best job of each class that can
//! start, so a VM never idles while a job could run on it, even when the
//! fair choice cannot start, and the cost per job is O(classes ×
//! courselabs + log n), never a walk of the queue.

use crate::model::JobId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

pub use crate::config::Scheduling as Policy;

/// What kind of VM a job needs: jobs of one class can share VMs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Class {
    pub image: String,
    pub vmms: String,
    /// Jobs with their own cloud credentials run on a fresh VM in that
    /// account, never on a VM of the server's.
    pub own_account: bool,
}

/// What the configuration says of a courselab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabPolicy {
    /// Share of starts against other courselabs with queued jobs (>= 1).
    pub weight: u32,
    /// Jobs of the courselab that may run at once.
    pub max_running: Option<usize>,
}

impl Default for LabPolicy {
    fn default() -> Self {
        LabPolicy {
            weight: 1,
            max_running: None,
        }
    }
}

/// A job entering the queue.
#[derive(Debug, Clone, Copy)]
pub struct QueuedJob<'a> {
    pub id: JobId,
    pub courselab: &'a str,
    pub submitter: &'a str,
    pub class: &'a Class,
    pub lab: LabPolicy,
}

type ClassId = usize;
type LabId = u64;
type SubId = u64;

/// A courselab's pass grows by `STRIDE / weight` per ms of VM time its jobs
/// use; 720,720 is divisible by every weight up to 16, so common weights
/// are exact.
const STRIDE: u64 = 720_720;

const MAX_SERVED_REMEMBERED: usize = 100_000;

/// The VM time a start is charged before any job of the server has ended.
const FIRST_ESTIMATE_MS: u64 = 1;

#[derive(Debug)]
struct Lab {
    name: Arc<str>,
    policy: LabPolicy,
    /// Stride scheduling's pass: the courselab with the lowest starts next.
    pass: u64,
    queued: usize,
    running: usize,
    /// Recent mean run time of the courselab's jobs (ms), once one ended.
    mean_ms: Option<u64>,
}

/// A job `next` gave out, until it stops running.
#[derive(Debug)]
struct Started {
    lab: LabId,
    sub: SubId,
    at: Instant,
    /// VM time charged to its courselab at the start (ms).
    charged_ms: u64,
}

#[derive(Debug)]
struct Submitter {
    lab: LabId,
    name: Arc<str>,
    /// Jobs started since the submitter last had nothing queued or running.
    round: u64,
    /// Jobs of the submitter started in this courselab lately (see
    /// [`Scheduler::served`]), queued or not in between.
    served: u64,
    queued: usize,
    running: usize,
    /// The classes in which the submitter has queued jobs (almost always one).
    classes: Vec<ClassId>,
}

/// Where a candidate job stands: the lowest starts first. Fair: its
/// courselab's pass (ties to the older courselab), its submitter's round,
/// its id. Fifo: its id alone.
type OrderKey = (u64, LabId, u64, JobId);

/// A submitter's place in a courselab's line within one class: its round,
/// then its oldest queued job of that class.
type LaneKey = (u64, u64, JobId, SubId);

#[derive(Debug, Default)]
struct ClassQueue {
    /// Per courselab with queued jobs of this class, its submitters in the
    /// order they are served.
    labs: HashMap<LabId, BTreeSet<LaneKey>>,
}

/// The queue of jobs waiting for a VM, and the policy choosing among them.
#[derive(Debug, Default)]
pub struct Scheduler {
    policy: Policy,
    classes: Vec<Class>,
    class_ids: HashMap<Class, ClassId>,
    class_queues: Vec<ClassQueue>,
    labs: HashMap<LabId, Lab>,
    lab_ids: HashMap<Arc<str>, LabId>,
    subs: HashMap<SubId, Submitter>,
    sub_ids: HashMap<(LabId, Arc<str>), SubId>,
    /// Per courselab and submitter, its jobs started lately, kept while it
    /// has nothing queued: among submitters of the same round, the one
    /// served least goes first, so a student's first submission ever is
    /// not behind another's tenth. Forgotten wholesale at
    /// [`MAX_SERVED_REMEMBERED`] entries, which bounds its memory.
    served: HashMap<(Arc<str>, Arc<str>), u64>,
    next_id: u64,
    /// Each submitter's queued jobs of one class, oldest first.
    lanes: HashMap<(ClassId, SubId), BTreeSet<JobId>>,
    queued: BTreeMap<JobId, (ClassId, SubId)>,
    running: HashMap<JobId, Started>,
    /// Recent mean run time of every courselab's jobs (ms): the first
    /// estimate of a courselab none of whose jobs has ended yet.
    mean_ms: Option<u64>,
    /// The pass of the courselab that started a job last: a courselab whose
    /// queue was empty starts from here, so it banks no share while idle.
    virtual_time: u64,
}

impl Scheduler {
    pub fn new(policy: Policy) -> Scheduler {
        Scheduler {
            policy,
            ..Scheduler::default()
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Jobs queued.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    pub fn contains(&self, id: JobId) -> bool {
        self.queued.contains_key(&id)
    }

    /// The oldest queued job.
    pub fn oldest(&self) -> Option<JobId> {
        self.queued.keys().next().copied()
    }

    /// Jobs of `submitter` in `courselab` that are queued.
    pub fn queued_of(&self, courselab: &str, submitter: &str) -> usize {
        self.lab_ids
            .get(courselab)
            .and_then(|lab| self.sub_ids.get(&(*lab, Arc::from(submitter))))
            .and_then(|sub| self.subs.get(sub))
            .map_or(0, |s| s.queued)
    }

    /// Jobs of `courselab` started and not yet finished.
    pub fn running_of(&self, courselab: &str) -> usize {
        self.lab_ids
            .get(courselab)
            .and_then(|lab| self.labs.get(lab))
            .map_or(0, |lab| lab.running)
    }

    /// Jobs started and not yet finished.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// The jobs started and not yet finished, in no order.
    pub fn running(&self) -> impl Iterator<Item = JobId> + '_ {
        self.running.keys().copied()
    }

    /// Queues a job. A job already queued is left where it is (false).
    pub fn push(&mut self, job: QueuedJob<'_>) -> bool {
        if self.queued.contains_key(&job.id) {
            return false;
        }
        let class = self.class_id(job.class);
        let lab_id = self.lab_id(job.courselab);
        let virtual_time = self.virtual_time;
        if let Some(lab) = self.labs.get_mut(&lab_id) {
            lab.policy = job.lab;
            if lab.queued == 0 {
                lab.pass = lab.pass.max(virtual_time);
            }
            lab.queued += 1;
        }
        let sub = self.sub_id(lab_id, job.submitter);
        self.detach(sub);
        if let Some(s) = self.subs.get_mut(&sub) {
            s.queued += 1;
            if !s.classes.contains(&class) {
                s.classes.push(class);
            }
        }
        self.lanes.entry((class, sub)).or_default().insert(job.id);
        self.queued.insert(job.id, (class, sub));
        self.attach(sub);
        true
    }

    /// Takes a queued job out without starting it. False if it was not queued.
    pub fn remove(&mut self, id: JobId) -> bool {
        let Some((class, sub)) = self.queued.get(&id).copied() else {
            return false;
        };
        self.unqueue(id, class, sub, None);
        true
    }

    /// Chooses the job to start now among the classes `can_start` accepts,
    /// takes it out of the queue and counts it running until
    /// [`Scheduler::finished`]. `can_start` is asked at most once per class.
    pub fn next(
        &mut self,
        now: Instant,
        mut can_start: impl FnMut(&Class) -> bool,
    ) -> Option<JobId> {
        let mut best: Option<(OrderKey, ClassId, SubId)> = None;
        for (class, queue) in self.class_queues.iter().enumerate() {
            if queue.labs.is_empty() || !can_start(&self.classes[class]) {
                continue;
            }
            for (lab_id, line) in &queue.labs {
                let Some(lab) = self.labs.get(lab_id) else {
                    continue;
                };
                if lab.policy.max_running.is_some_and(|max| lab.running >= max) {
                    continue;
                }
                let Some(&(round, _, oldest, sub)) = line.first() else {
                    continue;
                };
                let key = match self.policy {
                    Policy::Fair => (lab.pass, *lab_id, round, oldest),
                    Policy::Fifo => (0, 0, 0, oldest),
                };
                if best.as_ref().is_none_or(|(best_key, ..)| key < *best_key) {
                    best = Some((key, class, sub));
                }
            }
        }
        let ((.., id), class, sub) = best?;
        self.unqueue(id, class, sub, Some(now));
        Some(id)
    }

    /// A job `next` gave out stopped running (finished, failed, or back to
    /// the queue). False if it was not running.
    /// `now` says how much VM time it used, which its courselab is charged.
    pub fn finished(&mut self, id: JobId, now: Instant) -> bool {
        let Some(started) = self.running.remove(&id) else {
            return false;
        };
        let used_ms = u64::try_from(now.saturating_duration_since(started.at).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.mean_ms = Some(moving_mean(self.mean_ms, used_ms));
        if let Some(lab) = self.labs.get_mut(&started.lab) {
            lab.running = lab.running.saturating_sub(1);
            lab.mean_ms = Some(moving_mean(lab.mean_ms, used_ms));
            // The start was charged an estimate: now the real VM time.
            let weight = u64::from(lab.policy.weight.max(1));
            let stride = |ms: u64| ms.saturating_mul(STRIDE) / weight;
            lab.pass = lab
                .pass
                .saturating_add(stride(used_ms))
                .saturating_sub(stride(started.charged_ms));
        }
        if let Some(s) = self.subs.get_mut(&started.sub) {
            s.running = s.running.saturating_sub(1);
        }
        self.forget_sub_if_idle(started.sub);
        self.forget_lab_if_idle(started.lab);
        true
    }

    /// Takes a job out of the queue, started at `started` or not at all.
    fn unqueue(&mut self, id: JobId, class: ClassId, sub: SubId, started: Option<Instant>) {
        self.detach(sub);
        self.queued.remove(&id);
        if let Some(lane) = self.lanes.get_mut(&(class, sub)) {
            lane.remove(&id);
            if lane.is_empty() {
                self.lanes.remove(&(class, sub));
            }
        }
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        s.queued = s.queued.saturating_sub(1);
        if started.is_some() {
            s.running += 1;
            if self.policy == Policy::Fair {
                s.round += 1;
                s.served += 1;
                if self.served.len() >= MAX_SERVED_REMEMBERED {
                    self.served.clear();
                }
                if let Some(lab) = self.labs.get(&s.lab) {
                    self.served
                        .insert((lab.name.clone(), s.name.clone()), s.served);
                }
            }
        }
        let lab_id = s.lab;
        let server_mean = self.mean_ms.unwrap_or(FIRST_ESTIMATE_MS);
        if let Some(lab) = self.labs.get_mut(&lab_id) {
            lab.queued = lab.queued.saturating_sub(1);
            if let Some(at) = started {
                lab.running += 1;
                self.virtual_time = lab.pass;
                let charged_ms = lab.mean_ms.unwrap_or(server_mean).max(1);
                let weight = u64::from(lab.policy.weight.max(1));
                lab.pass = lab
                    .pass
                    .saturating_add(charged_ms.saturating_mul(STRIDE) / weight);
                self.running.insert(
                    id,
                    Started {
                        lab: lab_id,
                        sub,
                        at,
                        charged_ms,
                    },
                );
            }
        }
        self.attach(sub);
        self.forget_lab_if_idle(lab_id);
    }

    /// Takes the submitter's lanes out of their classes' lines, before a
    /// change of its round or its oldest jobs.
    fn detach(&mut self, sub: SubId) {
        let Some(s) = self.subs.get(&sub) else {
            return;
        };
        for &class in &s.classes {
            let Some(&oldest) = self.lanes.get(&(class, sub)).and_then(|l| l.first()) else {
                continue;
            };
            if let Some(line) = self.class_queues[class].labs.get_mut(&s.lab) {
                line.remove(&(s.round, s.served, oldest, sub));
                if line.is_empty() {
                    self.class_queues[class].labs.remove(&s.lab);
                }
            }
        }
    }

    /// Puts the submitter's lanes back after [`Scheduler::detach`].
    fn attach(&mut self, sub: SubId) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let lanes = &self.lanes;
        s.classes.retain(|class| lanes.contains_key(&(*class, sub)));
        if s.classes.is_empty() {
            self.forget_sub_if_idle(sub);
            return;
        }
        for &class in &s.classes {
            if let Some(&oldest) = lanes.get(&(class, sub)).and_then(|l| l.first()) {
                self.class_queues[class]
                    .labs
                    .entry(s.lab)
                    .or_default()
                    .insert((s.round, s.served, oldest, sub));
            }
        }
    }

    /// Forgets a submitter with nothing queued or running: its next job is
    /// a first one again.
    fn forget_sub_if_idle(&mut self, sub: SubId) {
        if let Some(s) = self.subs.get(&sub) {
            if s.queued == 0 && s.running == 0 {
                let key = (s.lab, s.name.clone());
                self.subs.remove(&sub);
                self.sub_ids.remove(&key);
            }
        }
    }

    fn forget_lab_if_idle(&mut self, lab_id: LabId) {
        if let Some(lab) = self.labs.get(&lab_id) {
            if lab.queued == 0 && lab.running == 0 {
                let name = lab.name.clone();
                self.labs.remove(&lab_id);
                self.lab_ids.remove(&name);
            }
        }
    }

    fn class_id(&mut self, class: &Class) -> ClassId {
        if let Some(&id) = self.class_ids.get(class) {
            return id;
        }
        let id = self.classes.len();
        self.classes.push(class.clone());
        self.class_queues.push(ClassQueue::default());
        self.class_ids.insert(class.clone(), id);
        id
    }

    fn lab_id(&mut self, courselab: &str) -> LabId {
        if let Some(&id) = self.lab_ids.get(courselab) {
            return id;
        }
        let id = self.fresh_id();
        let name: Arc<str> = Arc::from(courselab);
        self.labs.insert(
            id,
            Lab {
                name: name.clone(),
                policy: LabPolicy::default(),
                pass: self.virtual_time,
                queued: 0,
                running: 0,
                mean_ms: None,
            },
        );
        self.lab_ids.insert(name, id);
        id
    }

    fn sub_id(&mut self, lab: LabId, submitter: &str) -> SubId {
        let key = (lab, Arc::from(submitter));
        if let Some(&id) = self.sub_ids.get(&key) {
            return id;
        }
        let served = self
            .labs
            .get(&lab)
            .and_then(|l| self.served.get(&(l.name.clone(), key.1.clone())))
            .copied()
            .unwrap_or(0);
        let id = self.fresh_id();
        self.subs.insert(
            id,
            Submitter {
                lab,
                name: key.1.clone(),
                round: 0,
                served,
                queued: 0,
                running: 0,
                classes: Vec::new(),
            },
        );
        self.sub_ids.insert(key, id);
        id
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// A mean that follows recent values (each new one weighs 1/8).
fn moving_mean(mean: Option<u64>, value: u64) -> u64 {
    match mean {
        None => value,
        Some(mean) => mean - mean / 8 + value / 8,
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
