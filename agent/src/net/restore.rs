//! Coming back up: the state an earlier run saved, resynced into the maps it left pinned
//! (read once, never emptied first), with what no longer applies left out and reported.

use shoal_api::dataplane::{Desired, Rules};
use tracing::{error, info, warn};

use super::{
    journal::{Journal, Saved, Snapshot},
    mirror::{Delta, Mirror, Owner},
    overlay::{self, LocalLinks},
    removal_of, Dataplane, NetError,
};

impl Dataplane {
    /// Brings the kernel to the saved state (an earlier run's), adopting what the pinned maps
    /// hold: they are read once and brought to the state, not emptied first, so traffic goes
    /// on. An object that no longer applies (a workload's veth vanished while the agent was
    /// down) is left out, said (`left_out`), and the rest restored. If the saved state cannot
    /// be restored at all, its files are set aside for a look and the node starts empty at
    /// sequence 0, so the source sends everything again. From here on, what is applied is
    /// saved in `journal`.
    pub async fn restore(&mut self, journal: Journal, saved: Option<Saved>) {
        self.journal = Some(journal);
        let restored = match saved {
            Some(saved) => {
                let (sequence, desired, mut left_out) = self.saved_state(saved);
                self.resync(desired).await.map(|more| {
                    left_out.extend(more);
                    (sequence, left_out)
                })
            }
            None => self.resync(Desired::new(self.desired.rules().clone())).await.map(|left_out| (0, left_out)),
        };
        match restored {
            Ok((sequence, left_out)) => {
                self.sequence = sequence;
                self.left_out = left_out;
            }
            Err(e) => {
                error!(error = %e, "could not restore the saved dataplane state; setting it aside and starting empty");
                if let Some(Err(e)) = self.journal.as_mut().map(Journal::set_aside) {
                    error!(error = %e, "could not set the saved state aside");
                }
                self.sequence = 0;
                if let Err(e) = self.resync(Desired::new(self.desired.rules().clone())).await {
                    error!(error = %e, "could not clear the dataplane maps");
                }
            }
        }
        // Our workload programs are attached now: an older version's tracking has stopped.
        self.datapath.retire_old_conntrack(&self.config.pin_dir);
        let snapshot = Snapshot { sequence: self.sequence, spec: self.desired.to_spec() };
        if let Err(e) = self.save(&snapshot) {
            warn!(error = %e, "could not save the restored state");
        }
        info!(
            sequence = self.sequence,
            objects = self.mirror.owners().count(),
            left_out = self.left_out.len(),
            "dataplane restored"
        );
    }

    /// The state saved: the snapshot, the batches after it, without published ports this
    /// node now uses itself; objects that break rules grown stricter since are left out and
    /// said (the last value).
    fn saved_state(&self, saved: Saved) -> (u64, Desired, Vec<String>) {
        // Checked when it came in; an older version accepted overlapping subnets.
        let lenient = Rules::default();
        let (mut desired, mut left_out) = Desired::from_spec_leaving_out(&saved.snapshot.spec, lenient.clone());
        let mut sequence = saved.snapshot.sequence;
        for batch in saved.batches {
            for change in &batch.changes {
                if let Err(e) = desired.apply(change) {
                    warn!(error = %e, ?change, "a journaled change no longer applies");
                    left_out.push(format!("{}: {e}", change.object()));
                }
            }
            sequence = batch.sequence.unwrap_or(sequence);
        }
        let spec = self.restorable(desired.to_spec());
        let (mut desired, more) = Desired::from_spec_leaving_out(&spec, lenient);
        left_out.extend(more);
        desired.set_rules(self.desired.rules().clone());
        (sequence, desired, left_out)
    }

    /// Objects of the saved state this node could not restore (see `restore`).
    pub fn left_out(&self) -> &[String] {
        &self.left_out
    }

    /// Rebuilds the mirror of `desired` whole and makes the maps and the host match it,
    /// reading the maps once (at start). Objects whose entries cannot be made are left out
    /// of the state, and returned as said.
    async fn resync(&mut self, mut desired: Desired) -> Result<Vec<String>, NetError> {
        let owners = overlay::owners(&desired);
        // One endpoint at a time: one whose interface cannot be had is left out alone.
        let mut links = LocalLinks::new();
        let mut left_out = Vec::new();
        let mut leave_out = |desired: &mut Desired, owner: &Owner, e: &NetError| {
            warn!(object = ?owner, error = %e, "left out: it no longer applies on this node");
            left_out.push(format!("{}: {e}", removal_of(owner).object()));
            let _ = desired.apply(&removal_of(owner));
        };
        for owner in &owners {
            match self.local_links(&desired, std::slice::from_ref(owner)).await {
                Ok(found) => links.extend(found),
                Err(e) => leave_out(&mut desired, owner, &e),
            }
        }
        let mut mirror = Mirror::with_ids(self.mirror.ids.clone());
        let mut delta = Delta::default();
        for owner in overlay::owners(&desired) {
            match overlay::entries(&desired, &owner, self.config.node_addr, &links, &mut mirror) {
                Ok(entries) => {
                    mirror.replace(owner, entries, &mut delta);
                }
                Err(e) => leave_out(&mut desired, &owner, &e),
            }
        }
        if let Err(e) = self.datapath.sync(mirror.plan()) {
            // The maps may hold IDs of either state now: none is given out again.
            if let Ok(held) = self.datapath.lb_ids() {
                self.mirror.ids.hold(held.tables.iter().map(|(_, id)| *id), held.backends.iter().map(|(_, id, _)| *id));
            }
            return Err(e);
        }
        mirror.forget_held();
        // The maps hold the state now; the host's side is retried with the next change that
        // touches it rather than costing the node its state.
        if let Err(e) = self.apply_host_whole(mirror.plan()).await {
            error!(error = %e, "could not bring the host's side (NAT, routes) to the restored state");
        }
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = crate::dns::Names::from_spec(&desired.to_spec());
        self.desired = desired;
        self.mirror = mirror;
        Ok(left_out)
    }
}
