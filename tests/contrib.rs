//! The drivers in `contrib/`:
//!
//! * the GitLab Runner custom executor, its stages played in the order and
//!   with the variables the runner uses (config, prepare, run per script,
//!   cleanup) on a real guest: a passing job whose scripts share the job's
//!   clone, a failing job (the runner's build-failure code), a cancelled
//!   job (SIGTERM to the run stage, cleanup still runs), a cleanup without
//!   a prepare; a job whose variables copy a running job's ids never
//!   reaches that job's VM; nothing remains and the project's VM is
//!   untouched;
//! * the GitHub Actions composite action's script, run with a stand-in
//!   migrant: inputs arrive as data, never as shell code.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BUILD_FAILURE: i32 = 7;
const SYSTEM_FAILURE: i32 = 9;

/// The driver's stage script, copied where the test's user may read it
/// (the source tree may sit under a home only root enters).
fn driver(env: &Env, stage: &str) -> PathBuf {
    let dir = env.root.path().join("driver");
    if !dir.exists() {
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/gitlab-runner");
        for e in std::fs::read_dir(&src)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
        {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap_or_else(|e| panic!("{e}"));
        }
        if let Some(u) = &env.user {
            chown_tree(&dir, u);
        }
    }
    dir.join(format!("{stage}.sh"))
}

/// A stage as the runner starts it: `STAGE.sh PROJECT ARGS…` with the
/// job's response (`JOB_RESPONSE_FILE`, GitLab's job id `job`), the
/// job's variables (`CUSTOM_ENV_…`, which the job itself may set) and the
/// failure codes.
fn stage(env: &Env, name: &str, job: u32, args: &[&str]) -> Command {
    let dir = env.root.path().join(format!("builds/job-{job}"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let response = dir.join("response.json");
    std::fs::write(
        &response,
        format!("{{\"id\": {job}, \"token\": \"job-token-{job}\", \"job_info\": {{\"id\": 1}}}}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The runner runs its stages as its own user: the test's.
    if let Some(u) = &env.user {
        chown_tree(&env.root.path().join("builds"), u);
    }
    let mut c = env.command("bash");
    c.arg(driver(env, name))
        .arg(&env.project)
        .args(args)
        .current_dir("/")
        .env("MIGRANT", env.exe())
        .env("MIGRANT_HOME", env.root.path().join("state"))
        .env("MIGRANT_RUNTIME", env.root.path().join("run"))
        .env("HOME", env.root.path().join("home"))
        .env_remove("SUDO_USER")
        .env_remove("SUDO_UID")
        .env_remove("MIGRANT_DIR")
        .env("JOB_RESPONSE_FILE", &response)
        .env("MIGRANT_GITLAB_RECORDS", env.root.path().join("records"))
        .env("CUSTOM_ENV_CI_RUNNER_ID", "1")
        .env("CUSTOM_ENV_CI_JOB_ID", job.to_string())
        .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
        .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
        .stdin(Stdio::null());
    c
}

fn output(mut c: Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("{e}"))
}

/// A script file GitLab would hand to the run stage.
fn script(env: &Env, name: &str, body: &str) -> PathBuf {
    let p = env.root.path().join(name);
    std::fs::write(&p, format!("set -eo pipefail\n{body}\n")).unwrap_or_else(|e| panic!("{e}"));
    p
}

/// Whether GitLab job `job` has a clone (named from its response).
fn job_vm_exists(env: &Env, job: u32) -> bool {
    std::fs::read_dir(env.root.path().join("state/vms"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("gitlab-{job}-"))
        })
}

#[test]
fn gitlab_runner_stages_run_each_job_in_its_own_clone() {
    let Some(image) = test_image() else { return };
    let env = Env::new("gitlab", &image, "");
    env.ok(&["up"]);
    env.ok(&["snapshot", "--memory", "--stop"]);
    let snapshot = env.state_dir().join("snapshot.qcow2");
    let mtime = || {
        std::fs::metadata(&snapshot)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let before = mtime();

    // config: JSON the runner reads.
    let out = output(stage(&env, "config", 101, &[]));
    assert!(out.status.success(), "{}", text(&out));
    let cfg: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(cfg["driver"]["name"], "migrant");
    assert_eq!(cfg["builds_dir"], "/var/tmp/gitlab/builds");
    assert_eq!(cfg["builds_dir_is_shared"], false);

    // A passing job: its scripts share the job's VM.
    let out = output(stage(&env, "prepare", 101, &[]));
    assert!(out.status.success(), "prepare: {}", text(&out));
    assert!(job_vm_exists(&env, 101));
    let get_sources = script(
        &env,
        "get_sources",
        "mkdir -p /var/tmp/gitlab/builds && echo fetched > /var/tmp/gitlab/builds/src",
    );
    let build = script(
        &env,
        "build_script",
        "test \"$(cat /var/tmp/gitlab/builds/src)\" = fetched\necho built",
    );
    for (s, name) in [(&get_sources, "get_sources"), (&build, "build_script")] {
        let out = output(stage(&env, "run", 101, &[&s.to_string_lossy(), name]));
        assert!(out.status.success(), "run {name}: {}", text(&out));
        if name == "build_script" {
            assert!(String::from_utf8_lossy(&out.stdout).contains("built"));
        }
    }
    let out = output(stage(&env, "cleanup", 101, &[]));
    assert!(out.status.success(), "cleanup: {}", text(&out));
    assert!(!job_vm_exists(&env, 101), "the job's VM outlived cleanup");

    // A failing job: the runner's build-failure code, then cleanup.
    assert!(output(stage(&env, "prepare", 102, &[])).status.success());
    let fail = script(&env, "failing", "echo failing; exit 3");
    let out = output(stage(
        &env,
        "run",
        102,
        &[&fail.to_string_lossy(), "build_script"],
    ));
    assert_eq!(out.status.code(), Some(BUILD_FAILURE), "{}", text(&out));
    assert!(output(stage(&env, "cleanup", 102, &[])).status.success());
    assert!(!job_vm_exists(&env, 102));

    // A cancelled job: SIGTERM to the run stage's process group, then
    // cleanup, as the runner does.
    assert!(output(stage(&env, "prepare", 103, &[])).status.success());
    let long = script(&env, "long", "echo started; sleep 300");
    let mut run = stage(&env, "run", 103, &[&long.to_string_lossy(), "build_script"]);
    let child = run
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(5));
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success(), "a cancelled run succeeded");
    let out = output(stage(&env, "cleanup", 103, &[]));
    assert!(out.status.success(), "cleanup after cancel: {}", text(&out));
    assert!(!job_vm_exists(&env, 103));
    assert!(
        wait_for(Duration::from_secs(10), || env
            .processes()
            .iter()
            .all(|(_, c)| !c.contains("gitlab-"))),
        "job processes left: {:?}",
        env.processes()
    );

    // The runner may clean up a job whose prepare never ran.
    assert!(output(stage(&env, "cleanup", 104, &[])).status.success());

    // A job whose variables copy a running job's ids (CI_JOB_ID and
    // CI_RUNNER_ID are the job's own to set) gets a VM of its own: its
    // stages never run in the victim's VM and its cleanup leaves it.
    assert!(output(stage(&env, "prepare", 105, &[])).status.success());
    let mark = script(&env, "mark", "echo victim-secret > /var/tmp/victim");
    let out = output(stage(
        &env,
        "run",
        105,
        &[&mark.to_string_lossy(), "build_script"],
    ));
    assert!(out.status.success(), "{}", text(&out));
    let attacker = |name: &str, args: &[&str]| {
        let mut c = stage(&env, name, 106, args);
        c.env("CUSTOM_ENV_CI_JOB_ID", "105")
            .env("CUSTOM_ENV_CI_RUNNER_ID", "1");
        c
    };
    let out = output(attacker("prepare", &[]));
    assert!(
        out.status.success(),
        "the attacker's prepare: {}",
        text(&out)
    );
    let peek = script(
        &env,
        "peek",
        "if test -e /var/tmp/victim; then echo in-victim; else echo own-vm; fi",
    );
    let out = output(attacker("run", &[&peek.to_string_lossy(), "build_script"]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("own-vm"),
        "the attacker's script ran in the victim's VM: {}",
        text(&out)
    );
    assert!(output(attacker("cleanup", &[])).status.success());
    assert!(
        !job_vm_exists(&env, 106),
        "the attacker's VM outlived cleanup"
    );
    assert!(
        job_vm_exists(&env, 105),
        "the attacker's cleanup destroyed the victim's VM"
    );
    let check = script(&env, "check", "cat /var/tmp/victim");
    let out = output(stage(
        &env,
        "run",
        105,
        &[&check.to_string_lossy(), "build_script"],
    ));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("victim-secret"),
        "{}",
        text(&out)
    );
    // A stage of a job that prepared nothing touches no VM; a runner
    // without a job response is refused before anything is made.
    let out = output(stage(
        &env,
        "run",
        107,
        &[&check.to_string_lossy(), "build_script"],
    ));
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{}", text(&out));
    let mut bare = stage(&env, "prepare", 108, &[]);
    bare.env_remove("JOB_RESPONSE_FILE");
    let out = output(bare);
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{}", text(&out));
    assert!(!job_vm_exists(&env, 108));
    assert!(output(stage(&env, "cleanup", 105, &[])).status.success());
    assert!(!job_vm_exists(&env, 105));

    // The project's VM: stopped, its snapshot as it was.
    assert!(env.ok(&["status"]).contains("state:       stopped"));
    assert_eq!(mtime(), before, "the snapshot was rewritten");
    let vms = names_in(&env.root.path().join("state/vms"));
    assert_eq!(vms, std::slice::from_ref(&env.name));
    env.ok(&["destroy"]);
    env.assert_clean();
}

/// The action's one step, with a stand-in `sudo` and `migrant` that record
/// their command lines: migrant runs as the runner's user (never through
/// sudo), a hostile `run` input reaches it as one argument and runs nothing
/// on the runner; where AppArmor restricts user namespaces, sudo installs
/// the profile migrant prints, and nothing else.
#[test]
fn github_action_passes_inputs_as_data() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let action = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/github-action/action.yml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let docs = yaml_rust2::YamlLoader::load_from_str(&action).unwrap_or_else(|e| panic!("{e}"));
    let step = &docs[0]["runs"]["steps"][0];
    assert_eq!(docs[0]["runs"]["using"].as_str(), Some("composite"));
    let body = step["run"]
        .as_str()
        .unwrap_or_else(|| panic!("no run step"));
    assert!(
        !body.contains("${{"),
        "inputs pasted into the script: {body}"
    );

    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap_or_else(|e| panic!("{e}"));
    let record = dir.path().join("args");
    let write = |name: &str, text: &str| {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let sudo_log = dir.path().join("sudo.log");
    write(
        "sudo",
        &format!(
            "#!/bin/sh\necho \"$*\" >> {}\n[ \"$1\" = -n ] && shift\nexec \"$@\"\n",
            sudo_log.display()
        ),
    );
    let installed = dir.path().join("installed");
    write(
        "fake-migrant",
        &format!(
            "#!/bin/sh\nif [ \"$1 $2\" = \"doctor --apparmor-profile\" ]; then echo 'touch {}'; exit 0; fi\n\
             for a in \"$@\"; do printf '%s\\0' \"$a\"; done > {}\n",
            installed.display(),
            record.display()
        ),
    );
    let sysctl = dir.path().join("restrict");
    let pwned = dir.path().join("pwned");
    let hostile = format!(
        "make test\"; touch {} #$(touch {})",
        pwned.display(),
        pwned.display()
    );
    for (cold, want_cold, restricted) in [("false", false, "0"), ("true", true, "1")] {
        std::fs::write(&sysctl, restricted).unwrap_or_else(|e| panic!("{e}"));
        // The step's environment, as the runner builds it from the inputs.
        let status = Command::new("bash")
            .arg("-c")
            .arg(body)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("MIGRANT_BIN", "fake-migrant")
            .env("MIGRANT_PROJECT", "/srv/ci vm")
            .env("MIGRANT_RUN", &hostile)
            .env("MIGRANT_COLD", cold)
            .env("MIGRANT_APPARMOR_SYSCTL", &sysctl)
            .status()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success());
        let args = std::fs::read(&record).unwrap_or_else(|e| panic!("{e}"));
        let args: Vec<String> = args
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mut want = vec!["-C", "/srv/ci vm", "run", "--snapshot", "--rm", "--clone"];
        if want_cold {
            want.push("--cold");
        }
        want.extend(["--", hostile.as_str()]);
        assert_eq!(args, want);
        assert!(!pwned.exists(), "the input ran as shell code");
        // sudo only where AppArmor restricts, and only for the profile.
        let sudo = std::fs::read_to_string(&sudo_log).unwrap_or_default();
        match restricted {
            "1" => {
                assert_eq!(sudo, "-n true\n-n sh\n");
                assert!(installed.exists(), "the profile was not installed");
            }
            _ => assert_eq!(sudo, "", "sudo ran"),
        }
    }
}
