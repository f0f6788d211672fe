//! Step boundaries: the points between the parts of a step where a test injects a crash (the
//! testkit's crash harness, `WorkerBuilder::step_hook`), and the hook type that does it.

use std::sync::Arc;

use crate::job::JobId;

/// A point between the parts of a step, where a crash can be injected to test recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BoundaryPoint {
    /// Before the step's key is claimed.
    BeforeClaim,
    /// After the effect ran, before its record is written (for a transactional step: before the
    /// commit that holds both).
    BeforeRecord,
    /// After the record is written (committed).
    AfterRecord,
}

/// Where a step is, for a [`BoundaryHook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    /// The job.
    pub job_id: JobId,
    /// The step's name.
    pub step: String,
    /// The point.
    pub point: BoundaryPoint,
}

/// Called at every step boundary. A hook that wants to simulate a crash there panics with
/// [`InjectedCrash`]; the worker then abandons the attempt without writing anything, as a killed
/// process would, and the job is rescued when its lease expires.
pub type BoundaryHook = Arc<dyn Fn(&Boundary) + Send + Sync>;

/// The panic payload of a crash injected at a step boundary.
#[derive(Debug, Clone)]
pub struct InjectedCrash(pub Boundary);
