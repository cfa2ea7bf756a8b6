//! Keeping the repository and routing in step with an MLflow Model Registry
//! ([`crate::sources::mlflow`]), one task per `[[sources.mlflow]]` entry.
//!
//! Every poll: versions behind the stable and canary aliases are published into the
//! repository (atomic publish, with lineage) and loaded; the stable alias becomes
//! routing's stable version and the canary alias a canary with the model's rollout plan,
//! through [`control::apply`], the one writer; a version that fails to load gets the
//! reason in its `modelgate.state` tag; a version deleted in MLflow that routing no
//! longer names is removed (requests in flight finish on it: the registry drops a
//! version when its last reference goes). Between polls the task watches routing: a
//! promotion or rollback (by the rollout controller or an operator) is written back
//! (aliases and the tag), retried with backoff, and while a write-back is owed the
//! model's aliases are not applied (they are stale until it lands). MLflow being down
//! never touches what serves: the poll is retried with backoff and reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::control::{self, Action, Control};
use super::{Canary, RolloutState, TrafficSpec};
use crate::error::{Error, Result};
use crate::lineage::Lineage;
use crate::metrics;
use crate::registry::Registry;
use crate::sources::mlflow::{self, Client, MlflowConfig, Published, Remote, STATE_TAG};
use crate::util::blocking;

/// The actor of routing changes made from MLflow aliases, in the audit log.
pub const ACTOR: &str = "mlflow";

/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A change to write back to MLflow.
#[derive(Debug, Clone, PartialEq)]
enum WriteBack {
    /// `version` became stable.
    Promoted { version: u64, reason: String },
    /// `version` was rolled back.
    RolledBack { version: u64, reason: String },
    /// Only a tag (canary entered, load failure).
    Tag { version: u64, value: String },
}

#[derive(Default)]
struct ModelState {
    /// Routing as last seen, to tell a change made by someone else.
    seen: Option<TrafficSpec>,
    /// Write-backs owed, oldest first.
    owed: VecDeque<WriteBack>,
    /// Failure reasons already tagged, by version.
    tagged: BTreeMap<u64, String>,
}

struct Backoff {
    next: Instant,
    failures: u32,
    base: Duration,
}

impl Backoff {
    fn new(base: Duration) -> Backoff {
        Backoff {
            next: Instant::now(),
            failures: 0,
            base,
        }
    }
    fn due(&self) -> bool {
        Instant::now() >= self.next
    }
    fn ok(&mut self, every: Duration) {
        self.failures = 0;
        self.next = Instant::now() + every;
    }
    /// Doubles the wait from `base` up to [`MAX_BACKOFF`], with jitter.
    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.base.saturating_mul(1 << self.failures.min(8));
        let wait = exp.min(MAX_BACKOFF).mul_f64(0.75 + fastrand::f64() / 2.0);
        self.next = Instant::now() + wait;
        wait
    }
}

/// Checks the credentials of every source at start-up (and for `--validate`): refused
/// credentials or a bad setting are an error; an unreachable server is only logged
/// (serving goes on, the task retries).
pub async fn check(sources: &[MlflowConfig]) -> Result<()> {
    for cfg in sources {
        let client = Client::new(cfg)?;
        match client.check().await {
            Ok(()) => {}
            Err(e @ Error::Unauthenticated(_)) => return Err(Error::Config(e.to_string())),
            Err(e) => {
                tracing::warn!(tracking_uri = %cfg.tracking_uri, error = %e, "MLflow is not reachable now; serving what is loaded, retrying");
                metrics::count_source_error("mlflow", "unreachable");
            }
        }
    }
    Ok(())
}

/// Runs one source until shutdown.
pub async fn run(
    registry: Arc<Registry>,
    control: Arc<Control>,
    cfg: MlflowConfig,
    shutdown: CancellationToken,
) {
    let client = match Client::new(&cfg) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "MLflow source not started");
            return;
        }
    };
    let poll_every = Duration::from_secs(cfg.poll_secs);
    let mut poll = Backoff::new(poll_every);
    let mut write = Backoff::new(Duration::from_millis(500));
    let mut states: HashMap<String, ModelState> = HashMap::new();
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // The models this source serves: the named ones and those the filter found at the
    // last poll.
    let mut names: Vec<String> = cfg.models.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Promotions and rollbacks made here since the last look.
        for name in &names {
            let st = states.entry(name.clone()).or_default();
            watch_routing(&registry, &control, name, st);
        }
        if write.due() && states.values().any(|s| !s.owed.is_empty()) {
            let mut failed = false;
            for name in &names {
                let st = states.entry(name.clone()).or_default();
                while let Some(wb) = st.owed.front().cloned() {
                    match write_back(&client, name, &wb).await {
                        Ok(()) => {
                            tracing::info!(model = %name, change = ?wb, "written back to MLflow");
                            st.owed.pop_front();
                        }
                        Err(e) => {
                            metrics::count_source_error("mlflow", "write_back");
                            let wait = write.failed();
                            tracing::warn!(model = %name, change = ?wb, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot write back to MLflow; retrying");
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    break;
                }
            }
            if !failed {
                write.ok(Duration::ZERO);
            }
        }
        if !poll.due() {
            continue;
        }
        let mut error = None;
        if let Some(filter) = &cfg.model_filter {
            match client.search_models(filter).await {
                Ok(found) => {
                    let mut all = cfg.models.clone();
                    for f in found {
                        if !all.contains(&f) {
                            all.push(f);
                        }
                    }
                    // A model that left the filter is no longer polled (nor written
                    // back to until it matches again); what serves stays.
                    names = all;
                }
                Err(e) => error = Some(e),
            }
        }
        for name in names.iter().filter(|_| error.is_none()) {
            let st = states.entry(name.clone()).or_default();
            if let Err(e) = sync_model(&registry, &control, &client, name, st).await {
                error = Some(e);
                break;
            }
        }
        match error {
            None => {
                if last_error.take().is_some() {
                    tracing::info!(tracking_uri = %cfg.tracking_uri, "MLflow reachable again");
                }
                poll.ok(poll_every);
            }
            Some(e) => {
                metrics::count_source_error(
                    "mlflow",
                    match e {
                        Error::Unauthenticated(_) => "refused",
                        _ => "unreachable",
                    },
                );
                let wait = poll.failed();
                let text = e.to_string();
                if last_error.as_deref() != Some(&text) {
                    tracing::error!(tracking_uri = %cfg.tracking_uri, error = %text, retry_in_ms = wait.as_millis() as u64, "MLflow poll failed; serving what is loaded");
                }
                last_error = Some(text);
            }
        }
    }
}

/// Notes a promotion or rollback that happened since routing was last seen.
fn watch_routing(registry: &Registry, control: &Control, name: &str, st: &mut ModelState) {
    let snapshot = registry.snapshot();
    let Ok(model) = snapshot.model(name) else {
        return;
    };
    let now = &model.routing;
    let Some(before) = st.seen.replace(now.clone()) else {
        return;
    };
    if before == *now {
        return;
    }
    let reason = || {
        control
            .audit
            .read(Some(name), 1)
            .ok()
            .and_then(|e| e.into_iter().next())
            .map(|e| format!("{} by {}: {}", e.action, e.actor, e.reason))
            .unwrap_or_default()
    };
    if let Some(v) = now.stable
        && before.stable != now.stable
    {
        st.owed.push_back(WriteBack::Promoted {
            version: v,
            reason: reason(),
        });
    }
    for &v in now.rejected.iter().filter(|v| !before.rejected.contains(v)) {
        st.owed.push_back(WriteBack::RolledBack {
            version: v,
            reason: reason(),
        });
    }
}

async fn write_back(client: &Client, name: &str, wb: &WriteBack) -> Result<()> {
    let cfg = client.config();
    match wb {
        WriteBack::Promoted { version, reason } => {
            let remote = client.model(name).await?;
            client.set_alias(name, &cfg.stable_alias, *version).await?;
            if remote.aliases.get(&cfg.canary_alias) == Some(version) {
                client.delete_alias(name, &cfg.canary_alias).await?;
            }
            client
                .set_tag(
                    name,
                    *version,
                    STATE_TAG,
                    &mlflow::state_tag("stable", reason),
                )
                .await
        }
        WriteBack::RolledBack { version, reason } => {
            let remote = client.model(name).await?;
            if remote.aliases.get(&cfg.canary_alias) == Some(version) {
                client.delete_alias(name, &cfg.canary_alias).await?;
            }
            client
                .set_tag(
                    name,
                    *version,
                    STATE_TAG,
                    &mlflow::state_tag("rolled_back", reason),
                )
                .await
        }
        WriteBack::Tag { version, value } => {
            match client.set_tag(name, *version, STATE_TAG, value).await {
                // The version was deleted meanwhile: nothing to tag.
                Err(Error::NotFound(_)) => Ok(()),
                other => other,
            }
        }
    }
}

/// One poll of one model. An error means MLflow could not be read (nothing changed).
async fn sync_model(
    registry: &Arc<Registry>,
    control: &Arc<Control>,
    client: &Arc<Client>,
    name: &str,
    st: &mut ModelState,
) -> Result<()> {
    let cfg = client.config();
    let remote = match client.model(name).await {
        // Not registered (yet): nothing to serve from it.
        Err(Error::NotFound(_)) => return Ok(()),
        other => other?,
    };
    let model_dir = registry.root().join(name);
    let stable = remote.aliases.get(&cfg.stable_alias).copied();
    let canary = remote.aliases.get(&cfg.canary_alias).copied();
    // Publish what the aliases name and is not here yet.
    let mut published = false;
    for v in stable.into_iter().chain(canary) {
        let Some(rv) = remote.versions.get(&v) else {
            continue;
        };
        if model_dir.join(v.to_string()).exists() {
            continue;
        }
        match client.publish(&model_dir, name, rv).await {
            Ok(p) => {
                published = true;
                metrics::count_source_published("mlflow", name);
                tracing::info!(model = name, version = v, outcome = ?p, "published from MLflow");
                if let Published::NotOnnx(why) = p {
                    st.tagged.insert(v, why.clone());
                    st.owed.push_back(WriteBack::Tag {
                        version: v,
                        value: mlflow::state_tag("failed", &why),
                    });
                }
            }
            Err(e @ Error::Unavailable(_)) => {
                metrics::count_source_error("mlflow", "download");
                tracing::warn!(model = name, version = v, error = %e, "download from MLflow failed; retrying at the next poll");
            }
            Err(e) => return Err(e),
        }
    }
    retire_deleted(registry, control, name, &remote, &mut published).await;
    if published {
        let r = Arc::clone(registry);
        let n = name.to_string();
        blocking("publishing", move || r.refresh(&n)).await?;
    }
    let snapshot = registry.snapshot();
    let Ok(model) = snapshot.model(name) else {
        return Ok(());
    };
    // Load failures go on the MLflow version's tag, once per reason.
    for (&v, reason) in &model.failed {
        if remote.versions.contains_key(&v)
            && !model.versions.contains_key(&v)
            && st.tagged.get(&v) != Some(reason)
        {
            st.tagged.insert(v, reason.clone());
            st.owed.push_back(WriteBack::Tag {
                version: v,
                value: mlflow::state_tag("failed", reason),
            });
        }
    }
    if !st.owed.is_empty() {
        // MLflow's aliases are stale until what happened here is written back.
        return Ok(());
    }
    let routing = model.routing.clone();
    let ready = |v: u64| model.versions.contains_key(&v);
    let mut change: Option<(TrafficSpec, String, Option<u64>)> = None;
    if let Some(s) = stable.filter(|&s| ready(s) && routing.stable != Some(s)) {
        let mut after = routing.clone();
        after.stable = Some(s);
        if after.canary.as_ref().is_some_and(|c| c.version == s) {
            after.canary = None;
            after.rollout = None;
        }
        change = Some((
            after,
            format!("MLflow alias '{}' is version {s}", cfg.stable_alias),
            None,
        ));
    } else if let Some(c) = canary.filter(|&c| {
        ready(c)
            && Some(c) != stable
            && Some(c) != routing.stable
            && !routing.rejected.contains(&c)
            && routing.canary.as_ref().is_none_or(|k| k.version != c)
    }) {
        let mut after = routing.clone();
        after.stable = after.stable.or(model.stable);
        after.canary = Some(Canary {
            version: c,
            weight: model.traffic.rollout.steps.first().copied().unwrap_or(0.0),
        });
        after.rollout = Some(RolloutState {
            plan: Some(model.traffic.rollout.clone()),
            ..RolloutState::default()
        });
        change = Some((
            after,
            format!("MLflow alias '{}' is version {c}", cfg.canary_alias),
            Some(c),
        ));
    }
    drop(snapshot);
    let Some((after, reason, entered)) = change else {
        return Ok(());
    };
    let (r, c, n) = (Arc::clone(registry), Arc::clone(control), name.to_string());
    let why = reason.clone();
    match blocking("routing from MLflow", move || {
        control::apply(&r, &c, &n, ACTOR, Action::Set, &why, |_, _| Ok(after))
    })
    .await
    {
        Ok(spec) => {
            tracing::info!(model = name, reason, "routing follows MLflow");
            // Ours: not a change to write back.
            st.seen = Some(spec);
            if let Some(c) = entered {
                st.owed.push_back(WriteBack::Tag {
                    version: c,
                    value: mlflow::state_tag("canary", &reason),
                });
            }
        }
        Err(e) => {
            tracing::error!(model = name, reason, error = %e, "cannot apply MLflow's aliases to routing");
        }
    }
    Ok(())
}

/// Removes version folders this source published whose MLflow version is gone, once
/// routing names them no more (a canary is taken out of routing first).
async fn retire_deleted(
    registry: &Arc<Registry>,
    control: &Arc<Control>,
    name: &str,
    remote: &Remote,
    changed: &mut bool,
) {
    let model_dir = registry.root().join(name);
    let snapshot = registry.snapshot();
    let routing = snapshot
        .model(name)
        .map(|m| m.routing.clone())
        .unwrap_or_default();
    drop(snapshot);
    let named: BTreeSet<u64> = routing.versions();
    for v in crate::registry::scan::version_folders(&model_dir) {
        if remote.versions.contains_key(&v) {
            continue;
        }
        let vdir = model_dir.join(v.to_string());
        let from_mlflow = Lineage::read(&vdir)
            .ok()
            .flatten()
            .and_then(|l| l.source)
            .is_some_and(|s| s.starts_with("mlflow:"));
        if !from_mlflow {
            continue;
        }
        if routing.canary.as_ref().is_some_and(|c| c.version == v) {
            let (r, c, n) = (Arc::clone(registry), Arc::clone(control), name.to_string());
            let why = format!("version {v} was deleted in MLflow");
            let res = blocking("retiring", move || {
                control::apply(&r, &c, &n, ACTOR, Action::Set, &why, |spec, _| {
                    let mut after = spec.clone();
                    after.canary = None;
                    after.rollout = None;
                    Ok(after)
                })
            })
            .await;
            if let Err(e) = res {
                tracing::warn!(model = name, version = v, error = %e, "cannot take a deleted MLflow version out of routing");
            }
            continue;
        }
        if named.contains(&v) {
            tracing::warn!(
                model = name,
                version = v,
                "version deleted in MLflow still serves as stable; kept until the stable alias moves"
            );
            continue;
        }
        // Hidden first (no longer a version), then removed.
        let hidden = model_dir.join(format!(".retired-{v}-{:08x}", fastrand::u32(..)));
        if std::fs::rename(&vdir, &hidden).is_ok() {
            let _ = std::fs::remove_dir_all(&hidden);
            tracing::info!(
                model = name,
                version = v,
                "version deleted in MLflow retired"
            );
            *changed = true;
        }
    }
}
