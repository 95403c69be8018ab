//! Stable ids. The data path knows services and backends by small numbers: a service's id
//! selects its backend-set slot and counters, a (service, backend) pair's its reset epoch and
//! `maxconn` count, and every flow records both. Those outlive the agent, so the ids are given
//! by name, once per instance, and kept in a pinned map (`IDS`, agent-only): an agent restarted
//! with services reordered, a backend inserted first or a service removed gives every name the
//! id it had, and a new name an id no other name has held while one is free.
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{names, MAX_BACKENDS, MAX_SERVICES};
use tracing::{info, warn};

use crate::config::Config;

/// One `IDS` entry: the name's 64-bit FNV-1a hash (little endian), then up to 56 bytes of the
/// name for people reading the map; all zero: the id was never given.
pub type Record = [u8; 64];

const ENTRIES: u32 = MAX_SERVICES + MAX_BACKENDS;

/// FNV-1a, 64 bits; never 0 for the names lb accepts (0 marks a free entry).
pub fn name_hash(name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

fn record(name: &str) -> Record {
    let mut r = [0u8; 64];
    r[..8].copy_from_slice(&name_hash(name).to_le_bytes());
    let n = name.len().min(56);
    r[8..8 + n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn hash_of(r: &Record) -> Option<u64> {
    let h = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
    (h != 0).then_some(h)
}

/// Ids for `names`: the id a name held (`held[id]` is the hash of the name that held `id`, if
/// any), else the lowest id never held, else the lowest id held by a name not in `names` (a
/// removed one; returned in the second list). Fails when there are more names than ids.
pub fn assign(held: &[Option<u64>], names: &[&str]) -> Result<(Vec<u32>, Vec<u32>)> {
    if names.len() > held.len() {
        bail!("{} names for {} ids", names.len(), held.len());
    }
    let mut taken = vec![false; held.len()];
    let mut ids: Vec<Option<u32>> = names
        .iter()
        .map(|n| {
            let h = name_hash(n);
            let id = held.iter().position(|x| *x == Some(h))?;
            taken[id] = true;
            Some(id as u32)
        })
        .collect();
    let mut reused = Vec::new();
    for id in ids.iter_mut().filter(|i| i.is_none()) {
        let fresh = (0..held.len()).find(|&j| !taken[j] && held[j].is_none());
        let j = match fresh {
            Some(j) => j,
            None => {
                // `names.len() <= held.len()`, so some id is not taken.
                let j = (0..held.len()).find(|&j| !taken[j]).unwrap_or_default();
                reused.push(j as u32);
                j
            }
        };
        taken[j] = true;
        *id = Some(j as u32);
    }
    Ok((
        ids.into_iter().map(Option::unwrap_or_default).collect(),
        reused,
    ))
}

/// Opens the instance's pinned `IDS` map, or creates and pins an empty one.
fn open_or_create(dir: &Path) -> Result<Array<MapData, Record>> {
    let path = dir.join(names::IDS);
    if !path.exists() {
        let map = Array::<MapData, Record>::create(ENTRIES, 0).context("create IDS")?;
        map.pin(&path).context("pin IDS")?;
    }
    let data = MapData::from_pin(&path).context("open the pinned IDS map")?;
    Array::try_from(Map::from_map_data(data)?).context("IDS has an unexpected layout")
}

/// Gives `cfg`'s services and backends their ids (see the module doc) and records them in the
/// instance's pinned `IDS` map in `dir`.
pub fn apply(cfg: &mut Config, dir: &Path) -> Result<()> {
    let mut map = open_or_create(dir)?;
    let held: Vec<Option<u64>> = (0..ENTRIES)
        .map(|i| map.get(&i, 0).ok().as_ref().and_then(hash_of))
        .collect();
    let (held_services, held_backends) = held.split_at(MAX_SERVICES as usize);
    let service_names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    let backend_names: Vec<&str> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
    let (service_ids, reused_s) = assign(held_services, &service_names)?;
    let (backend_ids, reused_b) = assign(held_backends, &backend_names)?;
    for id in reused_s {
        warn!(id, "all service ids were used once: a new service takes the id of a removed one (its counters continue)");
    }
    for id in reused_b {
        warn!(id, "all backend ids were used once: a new backend takes the id of a removed one (its counters continue)");
    }
    for (s, id) in cfg.services.iter_mut().zip(service_ids) {
        if held_services[id as usize].is_some() && s.id != id {
            info!(service = %s.name, id, position = s.id, "service keeps the id it had in the running instance");
        }
        s.id = id;
        map.set(id, record(&s.name), 0).context("write IDS")?;
    }
    for (b, id) in cfg.backends.iter_mut().zip(backend_ids) {
        if held_backends[id as usize].is_some() && b.id != id {
            info!(backend = %b.name, id, position = b.id, "backend keeps the id it had in the running instance");
        }
        b.id = id;
        map.set(MAX_SERVICES + id, record(&b.name), 0)
            .context("write IDS")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(names: &[Option<&str>], size: usize) -> Vec<Option<u64>> {
        let mut v: Vec<Option<u64>> = names.iter().map(|n| n.map(name_hash)).collect();
        v.resize(size, None);
        v
    }

    #[test]
    fn a_new_instance_numbers_by_position() {
        let (ids, reused) = assign(&held(&[], 4), &["write", "read", "http"]).unwrap();
        assert_eq!((ids, reused), (vec![0, 1, 2], vec![]));
    }

    #[test]
    fn reordered_names_keep_their_ids() {
        let h = held(&[Some("write"), Some("read"), Some("http")], 4);
        let (ids, _) = assign(&h, &["read", "http", "write"]).unwrap();
        assert_eq!(ids, vec![1, 2, 0]);
    }

    #[test]
    fn an_inserted_name_gets_an_id_never_held_and_a_removed_ones_id_stays_free() {
        let h = held(&[Some("db01"), Some("db02"), Some("db03")], 5);
        let (ids, reused) = assign(&h, &["db00", "db01", "db03"]).unwrap();
        assert_eq!(
            (ids, reused),
            (vec![3, 0, 2], vec![]),
            "db02's id 1 is not reused"
        );
    }

    #[test]
    fn only_when_every_id_was_held_is_a_removed_ones_reused_and_said() {
        let h = held(&[Some("a"), Some("b"), Some("c")], 3);
        let (ids, reused) = assign(&h, &["c", "d"]).unwrap();
        assert_eq!((ids, reused), (vec![2, 0], vec![0]));
        assert!(assign(&h, &["a", "b", "c", "d"]).is_err());
    }

    #[test]
    fn records_hold_the_hash_and_a_readable_prefix() {
        let r = record("neo4j-write");
        assert_eq!(hash_of(&r), Some(name_hash("neo4j-write")));
        assert_eq!(&r[8..19], b"neo4j-write");
        assert_eq!(hash_of(&[0u8; 64]), None);
    }
}
