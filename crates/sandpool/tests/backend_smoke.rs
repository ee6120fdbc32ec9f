//! Temporary smoke test of the zygote backend (to be folded into the integration suite).

use std::sync::Arc;
use std::time::Duration;

use sandpool_engine::backend::{Cell, SandboxFactory};
use sandpool_sandbox::cgroup::{CgroupLayout, SessionLimits};
use sandpool_sandbox::driver::{ZygoteFactory, ZygotePoolSettings};
use sandpool_sandbox::runtime::{provision, RuntimeSpec};
use sandpool_sandbox::uids::UidAllocator;

#[tokio::test(flavor = "multi_thread")]
async fn zygote_runs_code() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    let spec = RuntimeSpec {
        python: None,
        packages: vec![
            "numpy==2.4.6".into(),
            "pandas==3.1.1".into(),
            "matplotlib==3.11.2".into(),
            "setuptools==81.0.0".into(),
        ],
        index_url: None,
        dir: "/tmp/sandpool-dev/runtime".into(),
    };
    let runtime = Arc::new(provision(&spec).await.unwrap());
    let limits = SessionLimits {
        memory_bytes: 1 << 30,
        cpus: 1.0,
        max_processes: 64,
    };
    let cgroups = CgroupLayout::detect()
        .unwrap()
        .prepare_pool("smoketest", limits)
        .unwrap();
    let settings = ZygotePoolSettings {
        pool: "smoketest".into(),
        limits,
        data_dir_bytes: 64 << 20,
        tmp_dir_bytes: 64 << 20,
        max_open_files: 1024,
        output_cap: 10000,
        preload_modules: vec!["numpy".into(), "pandas".into(), "matplotlib.pyplot".into()],
        run_dir: "/tmp/sandpool-dev/run/smoketest".into(),
        zygote_exe: env!("CARGO_BIN_EXE_sandpool").into(),
    };
    let factory = ZygoteFactory::new(
        settings,
        runtime,
        Arc::new(UidAllocator::new(1_000_000_000, 1000)),
        cgroups,
    );
    let info = factory.start().await.unwrap();
    println!("{info:?}");
    let sandbox = factory.create().await.unwrap();
    for code in [
        "print(1)",
        "import os; os.getuid(), os.getcwd(), len(os.listdir('/proc'))",
        "x = 41\nx + 1",
        "import numpy as np; np.arange(5).sum()",
        "1/0",
        "import matplotlib.pyplot as plt; plt.plot([1,2]); None",
        "open('/etc/shadow').read()",
        "os.listdir('/')",
    ] {
        let out = sandbox
            .execute(Cell {
                code: code.into(),
                timeout: Duration::from_secs(10),
                output_cap: 1000,
            })
            .await;
        println!(
            "{code:?} => {:?}",
            out.map(|o| (
                o.status,
                o.stdout,
                o.stderr,
                format!("{:?}", o.result)
                    .chars()
                    .take(100)
                    .collect::<String>()
            ))
        );
    }
    sandbox.destroy().await;
    factory.shutdown().await;
}
