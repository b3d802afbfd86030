//! Loaded definitions, by name and version, and where their participants live.
//!
//! A definition version is immutable: storing the same version with other text is refused,
//! so a running saga always finds the exact plan it started with. A definition without a
//! `version:` is numbered here: the same text as a stored version is that version, and a
//! changed text becomes the next version.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prost_reflect::DescriptorPool;
use saga_engine::Plan;
use saga_engine::definition::{compile, parse};
use saga_store::{PutDefinition, SagaStore, StoredDefinition};

use crate::breakers::Breakers;
use crate::descriptors::{self, Fetched};
use crate::error::{Error, Result};

pub struct Registry {
    store: Arc<dyn SagaStore>,
    /// Participant name → endpoint, overriding what definitions say.
    overrides: BTreeMap<String, String>,
    /// How long to keep trying a participant's reflection service.
    descriptor_wait: Duration,
    /// Std locks: held only to read or insert, never across an await.
    plans: RwLock<BTreeMap<String, BTreeMap<u32, Arc<Plan>>>>,
    reflected: Mutex<HashMap<String, DescriptorPool>>,
    breakers: Breakers,
    /// Serialises puts, so two changed texts never race for the same new version number.
    put_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(
        store: Arc<dyn SagaStore>,
        overrides: BTreeMap<String, String>,
        descriptor_wait: Duration,
    ) -> Registry {
        Registry {
            store,
            overrides,
            descriptor_wait,
            plans: RwLock::new(BTreeMap::new()),
            reflected: Mutex::new(HashMap::new()),
            breakers: Breakers::default(),
            put_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Where `participant` of `plan` is reached.
    pub fn endpoint(&self, plan: &Plan, participant: &str) -> String {
        self.overrides
            .get(participant)
            .cloned()
            .or_else(|| {
                plan.participants
                    .get(participant)
                    .map(|p| p.endpoint.clone())
            })
            .unwrap_or_default()
    }

    async fn descriptors(
        &self,
        raw: &saga_engine::definition::RawDefinition,
        base: Option<&Path>,
    ) -> Fetched {
        let mut fetched = Fetched::default();
        for (name, participant) in &raw.participants {
            let p = &participant.value;
            let result = if let Some(file) = &p.descriptor_set {
                let path = match base {
                    Some(base) => base.join(&file.value),
                    None => PathBuf::from(&file.value),
                };
                descriptors::from_file(&path)
            } else {
                let endpoint = self
                    .overrides
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| p.endpoint.value.trim().to_owned());
                let cached = self
                    .reflected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&endpoint)
                    .cloned();
                match cached {
                    Some(pool) => Ok(pool),
                    None => {
                        let result =
                            descriptors::from_reflection(&endpoint, self.descriptor_wait).await;
                        if let Ok(pool) = &result {
                            self.reflected
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(endpoint, pool.clone());
                        }
                        result
                    }
                }
            };
            fetched.0.insert(name.clone(), result);
        }
        fetched
    }

    /// Parses and validates a definition without storing it; also returns the descriptors
    /// it was compiled against, encoded, by participant.
    pub async fn compile(
        &self,
        source: &str,
        yaml: &str,
        base: Option<&Path>,
    ) -> Result<(Plan, BTreeMap<String, Vec<u8>>)> {
        let raw = parse(source, yaml)?;
        let fetched = self.descriptors(&raw, base).await;
        let plan = compile(source, yaml, &raw, &fetched)?;
        let encoded = fetched
            .0
            .iter()
            .filter_map(|(name, pool)| {
                pool.as_ref()
                    .ok()
                    .map(|pool| (name.clone(), pool.encode_to_vec()))
            })
            .collect();
        Ok((plan, encoded))
    }

    /// Compiles a stored definition with the descriptors stored with it: no participant is
    /// contacted, and the plan is exactly the one its sagas were pinned to.
    pub fn compile_stored(stored: &StoredDefinition) -> Result<Plan> {
        let source = format!("{} v{} (stored)", stored.name, stored.version);
        let raw = parse(&source, &stored.yaml)?;
        let fetched = Fetched(
            raw.participants
                .keys()
                .map(|name| {
                    let pool = match stored.descriptors.get(name) {
                        Some(bytes) => DescriptorPool::decode(bytes.as_slice())
                            .map_err(|e| format!("stored descriptors do not decode: {e}")),
                        None => Err("no descriptors were stored with this version".to_owned()),
                    };
                    (name.clone(), pool)
                })
                .collect(),
        );
        let mut plan = compile(&source, &stored.yaml, &raw, &fetched)?;
        // A definition without `version:` was numbered when it was stored.
        plan.version = stored.version;
        Ok(plan)
    }

    /// The participants' circuit breakers.
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    fn insert(&self, plan: Arc<Plan>) {
        for participant in plan.participants.values() {
            if let Some(spec) = &participant.breaker {
                self.breakers.ensure(&participant.name, spec);
            }
        }
        let mut plans = self.plans.write().unwrap_or_else(|e| e.into_inner());
        plans
            .entry(plan.name.clone())
            .or_default()
            .insert(plan.version, plan);
    }

    /// Validates, stores durably and loads a definition. Returns the plan and whether this
    /// version is new. Storing a version again with other text is refused.
    pub async fn put(
        &self,
        source: &str,
        yaml: &str,
        base: Option<&Path>,
    ) -> Result<(Arc<Plan>, bool)> {
        let _serial = self.put_lock.lock().await;
        // The same text as a version already loaded (from the store, with the descriptors it
        // was compiled against): nothing to compile, and no participant needs to be reachable.
        let raw = parse(source, yaml)?;
        let name = raw.name.value.as_str();
        let same_text = match &raw.version {
            Some(version) => self
                .get(name, Some(version.value))
                .ok()
                .filter(|loaded| loaded.yaml == yaml),
            None => self.versions_of(name).into_iter().find(|p| p.yaml == yaml),
        };
        if let Some(loaded) = same_text {
            return Ok((loaded, false));
        }
        let (mut plan, descriptors) = self.compile(source, yaml, base).await?;
        if raw.version.is_none() {
            let latest = self.versions_of(name).last().map_or(0, |p| p.version);
            plan.version = latest + 1;
        }
        let plan = Arc::new(plan);
        let outcome = self
            .store
            .put_definition(StoredDefinition {
                name: plan.name.clone(),
                version: plan.version,
                yaml: yaml.to_owned(),
                descriptors,
            })
            .await?;
        match outcome {
            PutDefinition::Created => {
                self.insert(plan.clone());
                Ok((plan, true))
            }
            PutDefinition::Unchanged => {
                // Keep the plan compiled from the stored descriptors (loaded at start).
                let plan = self.get(&plan.name, Some(plan.version)).unwrap_or(plan);
                self.insert(plan.clone());
                Ok((plan, false))
            }
            PutDefinition::Conflict { .. } => Err(Error::VersionConflict {
                name: plan.name.clone(),
                version: plan.version,
            }),
        }
    }

    /// Loads every stored definition version from the store alone. Returns the ones that
    /// could not be compiled (their sagas cannot run until that is fixed).
    pub fn load_stored(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for stored in self.store.definitions()? {
            match Registry::compile_stored(&stored) {
                Ok(plan) => self.insert(Arc::new(plan)),
                Err(e) => problems.push(e.to_string()),
            }
        }
        Ok(problems)
    }

    /// Puts every `*.yaml` / `*.yml` file of `dir`, sorted by name. All files are tried;
    /// the errors of all of them are returned together.
    pub async fn load_dir(&self, dir: &Path) -> Result<Vec<Arc<Plan>>, Vec<String>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| vec![format!("cannot read {}: {e}", dir.display())])?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml")
            })
            .collect();
        files.sort();
        let mut plans = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            let source = file.display().to_string();
            match std::fs::read_to_string(&file) {
                Ok(yaml) => match self.put(&source, &yaml, file.parent()).await {
                    Ok((plan, _)) => plans.push(plan),
                    Err(Error::VersionConflict { name, version }) => errors.push(format!(
                        "{source}: definition `{name}` version {version} is already stored with different content; versions are immutable, so give the change a new version"
                    )),
                    Err(e) => errors.push(e.to_string()),
                },
                Err(e) => errors.push(format!("{source}: cannot read: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(plans)
        } else {
            Err(errors)
        }
    }

    /// The plan of `name` at `version`, or its latest version.
    pub fn get(&self, name: &str, version: Option<u32>) -> Result<Arc<Plan>> {
        let plans = self.plans.read().unwrap_or_else(|e| e.into_inner());
        let versions = plans
            .get(name)
            .ok_or_else(|| Error::UnknownDefinition(name.to_owned()))?;
        let found = match version {
            Some(v) => versions.get(&v),
            None => versions.values().next_back(),
        };
        found.cloned().ok_or_else(|| Error::UnknownVersion {
            name: name.to_owned(),
            version: version.unwrap_or(0),
            known: versions
                .keys()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Every loaded version of `name`, oldest first.
    fn versions_of(&self, name: &str) -> Vec<Arc<Plan>> {
        let plans = self.plans.read().unwrap_or_else(|e| e.into_inner());
        plans
            .get(name)
            .map(|versions| versions.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every definition name with its versions, ascending.
    pub fn list(&self) -> Vec<(String, Vec<u32>)> {
        let plans = self.plans.read().unwrap_or_else(|e| e.into_inner());
        plans
            .iter()
            .map(|(name, versions)| (name.clone(), versions.keys().copied().collect()))
            .collect()
    }
}
