//! Output files that appear under their final name only when complete.
//!
//! Data goes to a hidden temporary file beside the target; `commit` flushes, fsyncs and
//! renames it (then fsyncs the folder). Dropping without `commit` (an error, a panic)
//! removes the temporary file, and a killed process leaves only a hidden `.tmp` file,
//! never a truncated file under the final name.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file being written; see the module docs.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `target`; fails with `OutputExists` when it exists and `force` is off.
    pub fn create(target: &Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let file_name = target
            .file_name()
            .ok_or_else(|| Error::Config(format!("{}: not a file path", target.display())))?;
        let stem = format!(".{}.", file_name.to_string_lossy());
        remove_stale_temps(&dir, &stem);
        let temp = dir.join(format!("{stem}{}.tmp", std::process::id()));
        let file = File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(Self {
            target: target.to_path_buf(),
            temp,
            out: Some(BufWriter::with_capacity(8 << 20, file)),
        })
    }

    /// The buffered writer of the temporary file.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.out.as_mut().expect("writer used after commit")
    }

    /// Path of the temporary file (for error messages).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Flushes, fsyncs and renames into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let out = self.out.take().expect("commit called twice");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.temp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        drop(file);
        fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Makes the rename itself durable; not every filesystem supports it.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.target.clone())
    }
}

/// Removes temporary files that killed writers of the same target left behind.
fn remove_stale_temps(dir: &Path, stem: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(stem).and_then(|r| r.strip_suffix(".tmp")) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        if pid.parse::<u32>().is_ok() && !alive && Path::new("/proc/self").exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bp-atomic-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn dropped_file_leaves_nothing() {
        let dir = scratch("drop");
        let target = dir.join("m.gguf");
        {
            let mut f = AtomicFile::create(&target, false).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn temp_files_of_dead_writers_are_removed() {
        let dir = scratch("stale");
        // pid 0x7ffffffe is above Linux's pid_max, so no such process exists.
        let stale = dir.join(".m.gguf.2147483646.tmp");
        fs::write(&stale, b"half").unwrap();
        let f = AtomicFile::create(&dir.join("m.gguf"), false).unwrap();
        assert!(!stale.exists() || !Path::new("/proc/self").exists());
        drop(f);
    }

    #[test]
    fn commit_renames_and_existing_needs_force() {
        let dir = scratch("commit");
        let target = dir.join("m.gguf");
        let mut f = AtomicFile::create(&target, false).unwrap();
        f.write_all(b"done").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"done");
        let err = AtomicFile::create(&target, false).err().unwrap();
        assert_eq!(err.code(), "STATE_OUTPUT_EXISTS");
        assert!(AtomicFile::create(&target, true).is_ok());
    }
}
