//! Finding model files in a local Hugging Face cache folder (no network): a repo id such as
//! `stabilityai/stable-diffusion-xl-base-1.0` resolves to
//! `<hub cache>/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/<revision>/`, where the
//! hub cache is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, and the revision
//! is the commit `refs/<revision or main>` names (or the revision itself if it is a snapshot).

use std::path::{Path, PathBuf};

use engine::{Error, Result};

/// The hub cache folder from the environment (it need not exist).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `s` looks like a repo id (`org/name`, not an existing path).
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))) && !Path::new(s).exists()
}

/// The snapshot folder of `repo_id` in `cache` at `revision` (default "main").
pub fn resolve_repo_in(cache: &Path, repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(Error::File { path: repo_dir.display().to_string(), msg: format!("model {repo_id} is not in the local Hugging Face cache (set HF_HUB_CACHE or HF_HOME, or download it first)") });
    }
    let rev = revision.unwrap_or("main");
    let snapshots = repo_dir.join("snapshots");
    let from_ref = std::fs::read_to_string(repo_dir.join("refs").join(rev)).ok().map(|s| s.trim().to_string());
    let commit = from_ref.unwrap_or_else(|| rev.to_string());
    let snap = snapshots.join(&commit);
    if snap.is_dir() {
        return Ok(snap);
    }
    // No ref for `main`: a cache with exactly one snapshot is unambiguous.
    if revision.is_none() {
        let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect()).unwrap_or_default();
        if entries.len() == 1 {
            return Ok(entries[0].clone());
        }
    }
    Err(Error::File { path: snapshots.display().to_string(), msg: format!("no snapshot for revision {rev} of {repo_id}") })
}

/// `resolve_repo_in` over the cache folder the environment names.
pub fn resolve_repo(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_repo_in(&hub_cache_dir(), repo_id, revision)
}

/// A model folder from either a path or a repo id in the local cache.
pub fn resolve_model_dir(name_or_path: &str) -> Result<PathBuf> {
    let p = Path::new(name_or_path);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if is_repo_id(name_or_path) {
        return resolve_repo(name_or_path, None);
    }
    Err(Error::File { path: name_or_path.to_string(), msg: "no such file or folder, and not a repo id (org/name)".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_main_ref_and_single_snapshot() {
        let tmp = std::env::temp_dir().join(format!("lookahead-hub-{}", std::process::id()));
        let repo = tmp.join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots").join("abc123").join("unet")).unwrap();
        assert_eq!(resolve_repo_in(&tmp, "org/name", None).unwrap(), repo.join("snapshots").join("abc123"));
        std::fs::create_dir_all(repo.join("snapshots").join("def456")).unwrap();
        assert!(resolve_repo_in(&tmp, "org/name", None).is_err());
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "def456\n").unwrap();
        assert_eq!(resolve_repo_in(&tmp, "org/name", None).unwrap(), repo.join("snapshots").join("def456"));
        assert_eq!(resolve_repo_in(&tmp, "org/name", Some("abc123")).unwrap(), repo.join("snapshots").join("abc123"));
        let e = resolve_repo_in(&tmp, "org/other", None).unwrap_err().to_string();
        assert!(e.contains("org/other is not in the local Hugging Face cache"), "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
