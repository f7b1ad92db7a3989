//! [`BuildStore`] for the real store, [`LocalStore`].

use std::collections::BTreeSet;

use nixb_store::derivation::Derivation;
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::{StoreDir, StorePath};

use crate::store::{BuildStore, NewOutput, PathInfo, StoreFault, SubstitutedPath};

fn fault(e: nixb_store::local_store::StoreError) -> StoreFault {
    StoreFault::from_error(e)
}

impl BuildStore for LocalStore {
    fn store_dir(&self) -> &StoreDir {
        LocalStore::store_dir(self)
    }

    fn is_valid_path(&self, p: &StorePath) -> Result<bool, StoreFault> {
        LocalStore::is_valid_path(self, p).map_err(fault)
    }

    fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, StoreFault> {
        Ok(LocalStore::query_path_info(self, p)
            .map_err(fault)?
            .map(|i| PathInfo {
                nar_hash: i.nar_hash,
                nar_size: i.nar_size,
                references: i.references,
                deriver: i.deriver,
                ca: i.ca,
            }))
    }

    fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreFault> {
        LocalStore::query_references(self, p).map_err(fault)
    }

    fn compute_closure(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreFault> {
        LocalStore::compute_closure(self, paths).map_err(fault)
    }

    fn read_derivation(&self, drv: &StorePath) -> Result<Derivation, StoreFault> {
        LocalStore::read_derivation(self, drv).map_err(fault)
    }

    fn register_outputs(&self, outputs: &[NewOutput]) -> Result<(), StoreFault> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let infos: Vec<ValidPathInfo> = outputs
            .iter()
            .map(|o| ValidPathInfo {
                path: o.path.clone(),
                nar_hash: o.nar_hash.clone(),
                nar_size: o.nar_size,
                deriver: Some(o.deriver.clone()),
                references: o.references.clone(),
                registration_time: now,
                // Built here, not copied from elsewhere: Nix marks such paths ultimate.
                ultimate: true,
                sigs: Vec::new(),
                ca: o.ca.clone(),
            })
            .collect();
        LocalStore::register_valid_paths(self, &infos).map_err(fault)
    }

    fn has_path_failed(&self, p: &StorePath) -> Result<bool, StoreFault> {
        LocalStore::has_path_failed(self, p).map_err(fault)
    }

    fn register_failed_path(&self, p: &StorePath) -> Result<(), StoreFault> {
        LocalStore::register_failed_path(self, p).map_err(fault)
    }

    fn add_temp_root(&self, p: &StorePath) -> Result<(), StoreFault> {
        LocalStore::add_temp_root(self, p).map_err(fault)
    }

    fn register_substitute(&self, info: &SubstitutedPath) -> Result<(), StoreFault> {
        self.register_substitutes(std::slice::from_ref(info))
    }

    fn register_substitutes(&self, infos: &[SubstitutedPath]) -> Result<(), StoreFault> {
        let infos: Vec<ValidPathInfo> = infos
            .iter()
            .map(|info| ValidPathInfo {
                path: info.path.clone(),
                nar_hash: info.nar_hash.clone(),
                nar_size: info.nar_size,
                deriver: info.deriver.clone(),
                references: info.references.clone(),
                registration_time: 0,
                ultimate: false,
                sigs: info.sigs.clone(),
                ca: info.ca.clone(),
            })
            .collect();
        LocalStore::register_valid_paths(self, &infos).map_err(fault)
    }
}
