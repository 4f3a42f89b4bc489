//! Fault injection around the real path: the reconciler runs in-process inside a lab
//! namespace against real netlink and wireguard-go; a hook fails chosen operations of the
//! first pass, and the next pass must converge.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use wirefence_agent::config::BackendChoice;
use wirefence_agent::load;
use wirefence_agent::netlink::Netlink;
use wirefence_agent::plan::Op;
use wirefence_agent::reconcile::{ReconcileError, Reconciler};
use wirefence_agent::wg;
use wirefence_tests::*;

#[test]
fn failed_operations_mid_apply_converge_on_the_next_pass() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer_with(b, &["10.77.0.2/32", "fd77::2/128", "10.88.0.0/24", "10.89.0.0/24"]).write();
    let config = a.config_path();
    let state_dir = a.dir.join("state");
    let ifname = a.ifname.clone();

    let remaining = in_netns(&a.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let loaded = load::load(&config).unwrap();
            let backend = wg::select(BackendChoice::Userspace, "wireguard-go", state_dir, Default::default()).unwrap();
            let routes = Arc::new(AtomicUsize::new(0));
            let armed = Arc::new(AtomicUsize::new(1));
            let (r, arm) = (routes.clone(), armed.clone());
            // First pass only: the second route add and the WireGuard peer update fail.
            let hook = Arc::new(move |op: &Op| {
                if arm.load(Ordering::SeqCst) == 0 {
                    return None;
                }
                match op {
                    Op::AddRoute(_) if r.fetch_add(1, Ordering::SeqCst) == 1 => Some("route add refused".to_string()),
                    Op::UpsertPeer(_) => Some("peer update refused".to_string()),
                    _ => None,
                }
            });
            let rec = Reconciler::new(Netlink::connect().unwrap(), backend, PROTO).with_fault(hook);
            match rec.reconcile(&loaded.desired).await {
                Err(ReconcileError::Apply { failures, total }) => {
                    // The WireGuard settings and peers are one transaction: they fail together.
                    assert_eq!(failures.len(), 3, "{failures:?}");
                    assert!(total > 2);
                }
                other => panic!("expected a partial failure, got {other:?}"),
            }
            // The kernel is half-way: exactly the failed work is left.
            let left = rec.plan(&loaded.desired).await.unwrap();
            assert_eq!(left.ops.len(), 3, "{:?}", left.ops);
            assert!(left.ops.iter().any(|o| matches!(o, Op::ConfigureDevice { .. })));
            assert!(left.ops.iter().any(|o| matches!(o, Op::UpsertPeer(_))));
            assert!(left.ops.iter().any(|o| matches!(o, Op::AddRoute(_))));

            armed.store(0, Ordering::SeqCst);
            rec.reconcile(&loaded.desired).await.expect("second pass converges");
            let after = rec.plan(&loaded.desired).await.unwrap();
            assert!(after.is_empty(), "{:?}", after.ops);
            rec.teardown(std::slice::from_ref(&loaded.desired.ifname), &[PROTO], &[]).await.unwrap();
            rec.plan(&loaded.desired).await.unwrap().ops.len()
        })
    });
    assert!(remaining > 0);
    assert!(!a.ns.link_exists(&ifname));
    assert!(a.ns.owned_routes(PROTO).is_empty());
}
