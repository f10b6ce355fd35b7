//! `cargo xtask image`: the OCI image the DaemonSet runs, built offline with buildah.
//!
//! The image is `FROM scratch` plus a root filesystem staged here under target/image/rootfs:
//! the release `sockmesh` and `sockmesh-cni` at /usr/local/bin, and every shared library
//! `ldd` lists for `sockmesh` (the plugin is static; the dynamic loader included) at the path the loader looks for it,
//! with the host's symlinks (/lib -> usr/lib, /lib64/ld-linux-x86-64.so.2 -> ...) recreated.
//! The built image is then checked the way this machine can run it: mount its root filesystem
//! (`buildah from` + `buildah mount`) and run both binaries' `--version` there with chroot.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::toolchain::{self, run_checked};

/// The repository part of the tag; the DaemonSet's image is `IMAGE:<version>`.
pub const IMAGE: &str = "localhost/sockmesh";
const BINARIES: [&str; 2] = ["sockmesh", "sockmesh-cni"];
const CONTAINERFILE: &str = "deploy/Containerfile";

/// Builds the image from the release binaries in `release_dir` and checks it.
pub fn run(root: &Path, release_dir: &Path) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "`cargo xtask image` needs root (buildah storage, `buildah mount` and chroot); \
             run it as root, e.g. `sudo -E cargo xtask image`"
        );
    }
    toolchain::ensure_packages_for("building the image", &["buildah"])?;
    let context = root.join("target/image");
    let rootfs = context.join("rootfs");
    stage_rootfs(release_dir, &rootfs)?;

    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("{IMAGE}:{version}");
    let latest = format!("{IMAGE}:latest");
    let mut build = Command::new("buildah");
    build
        .current_dir(root)
        .args(["build", "-f", CONTAINERFILE])
        .args(["-t", &tag, "-t", &latest])
        .args([
            "--label",
            &format!("org.opencontainers.image.version={version}"),
        ])
        .arg(&context);
    run_checked(&mut build, "building the image")?;

    verify(&tag)?;
    eprintln!(
        "xtask: built {tag} (and {latest}); the root filesystem it was made from is in {}.\n\
         xtask: load it into your cluster's runtime, e.g. \
         `buildah push {tag} oci-archive:target/image/sockmesh.tar` then \
         `ctr -n k8s.io images import target/image/sockmesh.tar` on each node, \
         or push it to your registry and change the DaemonSet's image",
        rootfs.display()
    );
    Ok(())
}

/// Fresh target/image/rootfs with the binaries and what they load.
fn stage_rootfs(release_dir: &Path, rootfs: &Path) -> Result<()> {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    let bin = rootfs.join("usr/local/bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let mut libraries = Vec::new();
    for name in BINARIES {
        let binary = release_dir.join(name);
        if !binary.is_file() {
            bail!("{} is missing after the release build", binary.display());
        }
        fs::copy(&binary, bin.join(name))
            .with_context(|| format!("copying {} into the image", binary.display()))?;
        if is_static(&binary)? {
            eprintln!("xtask: image: {name} is statically linked");
            continue;
        }
        for library in ldd(&binary)? {
            if !libraries.contains(&library) {
                libraries.push(library);
            }
        }
    }
    if libraries.is_empty() {
        bail!("ldd listed no libraries; expected at least the dynamic loader");
    }
    for library in &libraries {
        eprintln!("xtask: image: {}", library.display());
        mirror(rootfs, library, 0)
            .with_context(|| format!("copying {} into the image", library.display()))?;
    }
    Ok(())
}

/// Whether `binary` has no program interpreter (`ldd` refuses such binaries).
fn is_static(binary: &Path) -> Result<bool> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    Ok(text.contains("not a dynamic executable") || text.contains("statically linked"))
}

/// The absolute paths `ldd` prints for `binary` (the loader included, the vDSO not).
fn ldd(binary: &Path) -> Result<Vec<PathBuf>> {
    let mut command = Command::new("ldd");
    command.arg(binary);
    eprintln!("xtask: listing shared libraries: {command:?}");
    let output = command.output().context("running ldd")?;
    if !output.status.success() {
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2
/// (0x...)` give their paths; `linux-vdso.so.1 (0x...)` has none.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line.contains("not found") {
            bail!("a shared library is missing: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|path| path.starts_with('/')) {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// Makes `path` resolve inside `rootfs` as it does on the host: real directories are created,
/// symlinks recreated with the same target text (then their targets mirrored too), and the
/// regular file at the end copied. Nothing is ever written through a symlink, so an absolute
/// link can never lead a write out of `rootfs`.
fn mirror(rootfs: &Path, path: &Path, depth: usize) -> Result<()> {
    if depth > 16 {
        bail!("too many levels of symbolic links at {}", path.display());
    }
    let components: Vec<Component> = path.components().collect();
    if components.first() != Some(&Component::RootDir) {
        bail!("{} is not absolute", path.display());
    }
    let mut host = PathBuf::from("/");
    for (index, component) in components.iter().enumerate().skip(1) {
        host.push(component);
        let inside = rootfs.join(host.strip_prefix("/").expect("absolute"));
        let meta =
            fs::symlink_metadata(&host).with_context(|| format!("reading {}", host.display()))?;
        let present = fs::symlink_metadata(&inside).is_ok();
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&host)?;
            if !present {
                symlink(&link, &inside)
                    .with_context(|| format!("creating the link {}", inside.display()))?;
            }
            let rest: PathBuf = components[index + 1..].iter().collect();
            let parent = host.parent().expect("below /");
            return mirror(rootfs, &normalize(&parent.join(link).join(rest)), depth + 1);
        } else if meta.is_dir() {
            if !present {
                fs::create_dir(&inside)
                    .with_context(|| format!("creating {}", inside.display()))?;
            }
        } else {
            fs::copy(&host, &inside).with_context(|| format!("copying {}", host.display()))?;
        }
    }
    Ok(())
}

/// Drops `.` and resolves `..` lexically (every directory before it is a real one here).
fn normalize(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

/// Runs both binaries from the image's own root filesystem, then cleans up.
fn verify(tag: &str) -> Result<()> {
    let container = output(Command::new("buildah").args(["from", "--pull=never", tag]))?;
    let result = (|| {
        let mountpoint = output(Command::new("buildah").args(["mount", &container]))?;
        let checked = BINARIES.iter().try_for_each(|name| {
            let binary = format!("/usr/local/bin/{name}");
            let version = output(Command::new("chroot").args([&mountpoint, &binary, "--version"]))
                .with_context(|| format!("running {binary} from the image"))?;
            eprintln!("xtask: image: {binary} --version: {version}");
            Ok(())
        });
        let unmounted = run_checked(
            Command::new("buildah").args(["umount", &container]),
            "unmounting the image",
        );
        checked.and(unmounted)
    })();
    let removed = run_checked(
        Command::new("buildah").args(["rm", &container]),
        "removing the working container",
    );
    result.and(removed)
}

/// Runs a command (printing it first) and returns its trimmed stdout.
fn output(command: &mut Command) -> Result<String> {
    eprintln!("xtask: {command:?}");
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_library_paths_from_ldd() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5a1f2000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1a2b0000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1a000000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a2f0000)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn normalizes_relative_links() {
        assert_eq!(
            normalize(Path::new("/usr/lib/../lib64/./ld.so")),
            PathBuf::from("/usr/lib64/ld.so")
        );
    }
}
