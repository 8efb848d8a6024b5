//! `tern jail --vcpu-cgroup`: tern's vCPU threads, and only they, in `tern/ID/vcpus` (cgroup v1
//! and v2), and its bad input refused with one line. (A module of the `jail` test, for its
//! helpers.)

use super::*;

/// The mount point of the cgroup hierarchy `pick` chooses from /proc/self/mounts
/// (fields: file system type, options).
fn mounted(pick: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && pick(f[2], f[3]))
        .map(|f| PathBuf::from(f[1]))
}

/// Fails under CI=true, else prints a loud SKIPPED line: `test` lacks `what`.
fn skip(test: &str, what: &str) {
    if in_ci() {
        panic!("{test}: needs {what} under CI=true");
    }
    eprintln!("\n*** SKIPPED {test}: needs {what} ***\n");
}

/// A hierarchy the vCPU threads are placed in: the /proc/PID/cgroup line `pick` chooses, the
/// thread list of its `vcpus` cgroup, and (file, value) pairs that must read back in
/// `tern/ID/vcpus` and in `tern/ID`.
struct Place<'a> {
    pick: fn(&str) -> bool,
    list: &'a str,
    vcpus: &'a [(&'a str, &'a str)],
    vm: &'a [(&'a str, &'a str)],
}

/// Whether /proc/PID/cgroup's controller list `c` has `name`.
fn has(c: &str, name: &str) -> bool {
    c.split(',').any(|c| c == name)
}

/// The name of a vCPU thread: tern-vcpuN.
fn is_vcpu(name: &str) -> bool {
    name.strip_prefix("tern-vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Boots a 2-vCPU probe jailed with `flags` (which place the vCPU threads) and checks, while
/// it runs, each of `places`: its `tern/ID/vcpus` lists every `tern-vcpuN` thread and no other
/// thread of tern's, and the values read back.
fn vcpu_threads_are_placed(test: &str, version: u8, flags: &[&str], places: &[Place]) {
    let (dir, base) = scratch_and_base(test);
    let serial = dir.path("serial.log");
    let id = format!("vcpus-v{version}-{}", std::process::id());
    let kernel = probe();
    let mut child = jail_cmd(
        &base,
        &id,
        flags,
        &[
            "--kernel",
            s(&kernel),
            "--memory",
            "64M",
            "--cpus",
            "2",
            "--cmdline",
            "probe.run=count probe.count_ms=3000",
            "--serial",
            &format!("file:{}", s(&serial)),
        ],
    )
    .stdin(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = wait_for_tern(&base.join("tern").join(&id), &mut child);
    wait_until("the guest's first tick", Duration::from_secs(20), || {
        !ticks(&serial).is_empty()
    });
    let want: BTreeSet<u32> = threads(pid)
        .iter()
        .filter(|(_, n)| is_vcpu(n))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(want.len(), 2, "{:?}", threads(pid));
    assert!(threads(pid).iter().any(|(_, n)| n == "tern-spawner"));
    let mut made = Vec::new();
    for place in places {
        let vm = cgroup_dir(pid, place.pick).expect("the VM's cgroup");
        assert!(vm.ends_with(format!("tern/{id}")), "{}", vm.display());
        let vcpus = vm.join("vcpus");
        let listed = || -> BTreeSet<u32> {
            std::fs::read_to_string(vcpus.join(place.list))
                .unwrap()
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect()
        };
        // Each vCPU thread moves itself as it starts: give the second a moment.
        wait_until("the vCPU threads in vcpus", Duration::from_secs(10), || {
            want.is_subset(&listed())
        });
        let got = listed();
        for (tid, name) in threads(pid) {
            // KVM's own worker threads (e.g. kvm-nx-lpage-recovery) follow the vCPU that
            // starts them; tern's threads are named tern*.
            if name.starts_with("tern") && !is_vcpu(&name) {
                assert!(!got.contains(&tid), "{name} ({tid}) in {}", vcpus.display());
            }
        }
        for (d, reads) in [(&vcpus, place.vcpus), (&vm, place.vm)] {
            for (file, value) in reads {
                let read = std::fs::read_to_string(d.join(file)).unwrap();
                assert_eq!(read.trim(), *value, "{}", d.join(file).display());
            }
        }
        made.push(vm);
    }
    // tern was told where, with descriptors the jailer opened.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert_eq!(
        args.matches("--vcpu-cgroup-fd=").count(),
        places.len(),
        "{args}"
    );
    let (code, err) = finish(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(!err.contains("stays out of its cgroup"), "{err}");
    for vm in made {
        let _ = std::fs::remove_dir(vm.join("vcpus"));
        remove_cgroup(&vm);
    }
}

#[test]
fn vcpu_threads_run_in_a_cgroup_v1_of_their_own() {
    let test = "vcpu_threads_run_in_a_cgroup_v1_of_their_own";
    if !require_root(test) || !require_kvm(test) {
        return;
    }
    let v1 = |name: &'static str| mounted(move |fs, o| fs == "cgroup" && has(o, name));
    let (Some(_), Some(cpuset)) = (v1("cpu"), v1("cpuset")) else {
        return skip(
            test,
            "cgroup v1 hierarchies with the cpu and cpuset controllers",
        );
    };
    // The first CPU the VM's cpuset will have (its parent's, the jailer's, which is ours).
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own
        .lines()
        .find_map(|l| l.split_once(":cpuset:").map(|(_, p)| p.to_string()))
        .unwrap();
    let cpus = std::fs::read_to_string(
        cpuset
            .join(path.trim_start_matches('/'))
            .join("cpuset.cpus"),
    );
    let cpus = cpus.unwrap();
    let first: String = cpus
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let pin = format!("cpuset.cpus={first}");
    // A quota for the VM and a smaller one for its vCPUs (v1 refuses a child a quota above its
    // parent's: the jailer writes the VM's first), and the vCPUs on one CPU.
    vcpu_threads_are_placed(
        test,
        1,
        &[
            "--cgroup-version",
            "1",
            "--cgroup",
            "cpu.cfs_quota_us=50000",
            "--vcpu-cgroup",
            "cpu.cfs_quota_us=40000",
            "--vcpu-cgroup",
            &pin,
        ],
        &[
            Place {
                pick: |c| has(c, "cpu"),
                list: "tasks",
                vcpus: &[("cpu.cfs_quota_us", "40000")],
                vm: &[("cpu.cfs_quota_us", "50000")],
            },
            Place {
                pick: |c| has(c, "cpuset"),
                list: "tasks",
                vcpus: &[("cpuset.cpus", &first)],
                vm: &[("cpuset.cpus", cpus.trim())],
            },
        ],
    );
}

#[test]
fn vcpu_threads_run_in_a_threaded_cgroup_v2_of_their_own() {
    let test = "vcpu_threads_run_in_a_threaded_cgroup_v2_of_their_own";
    if !require_root(test) || !require_kvm(test) {
        return;
    }
    let Some(mount) = mounted(|fs, _| fs == "cgroup2") else {
        return skip(test, "a cgroup2 hierarchy");
    };
    // cpu.max where the cpu controller is in v2 here; else a core file of every cgroup (hosts
    // that mount v1 leave the unified hierarchy without controllers).
    let own = cgroup_dir(std::process::id(), str::is_empty).unwrap_or(mount);
    let cpu = std::fs::read_to_string(own.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "cpu"));
    let (flag, file, value) = if cpu {
        ("cpu.max=50000 100000", "cpu.max", "50000 100000")
    } else {
        ("cgroup.max.descendants=0", "cgroup.max.descendants", "0")
    };
    vcpu_threads_are_placed(
        test,
        2,
        &["--cgroup-version", "2", "--vcpu-cgroup", flag],
        &[Place {
            pick: str::is_empty,
            list: "cgroup.threads",
            vcpus: &[("cgroup.type", "threaded"), (file, value)],
            vm: &[("cgroup.type", "domain threaded")],
        }],
    );
}

#[test]
fn bad_vcpu_cgroup_settings_get_one_line_errors() {
    let test = "bad_vcpu_cgroup_settings_get_one_line_errors";
    if !require_root(test) {
        return;
    }
    let (_dir, base) = scratch_and_base("jail-vcpucg-args");
    let k = probe();
    let run = ["--kernel", s(&k)];
    let bad = |flags: &[&str], want: &[&str]| {
        refused(&output(jail_cmd(&base, "vcg-bad", flags, &run)), want);
        assert!(!base.join("tern/vcg-bad/root").exists(), "{flags:?}");
    };
    // memory is a domain controller: a threaded cgroup cannot have it.
    bad(
        &["--cgroup-version", "2", "--vcpu-cgroup", "memory.max=1G"],
        &[
            "--vcpu-cgroup memory.max",
            "memory is not a threaded controller",
        ],
    );
    bad(
        &["--vcpu-cgroup", "cpu"],
        &["--vcpu-cgroup 'cpu'", "expected FILE=VALUE"],
    );
    bad(
        &["--vcpu-cgroup", "../cpu.max=1"],
        &["--vcpu-cgroup '../cpu.max=1'", "not a controller file"],
    );
    bad(
        &["--vcpu-cgroup", "nosuch.knob=1"],
        &[
            "--vcpu-cgroup nosuch.knob",
            "no cgroup hierarchy has the nosuch",
        ],
    );
}
