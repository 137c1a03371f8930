//! The state machine of kinds that are records drover keeps and nothing
//! more (roles, environments): they are active until deleted.
//!
//! ```text
//! active --delete--> deleting --ok--> deleted --err--> active
//! ```

use super::{named_enum, NotAllowed, TypedStep};
use crate::error::Result;

named_enum!(State {
    Active => "active",
    Deleting => "deleting",
    Deleted => "deleted",
});

named_enum!(Action {
    Delete => "delete",
});

/// The table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    match (state, action) {
        (State::Active, Action::Delete) => {
            Ok(TypedStep::Go { working: State::Deleting, ok: State::Deleted, err: State::Active })
        }
        (State::Deleting | State::Deleted, Action::Delete) => Err(NotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_of_the_table() {
        let delete = Ok(TypedStep::Go { working: State::Deleting, ok: State::Deleted, err: State::Active });
        assert_eq!(next(State::Active, Action::Delete), delete);
        assert_eq!(next(State::Deleting, Action::Delete), Err(NotAllowed));
        assert_eq!(next(State::Deleted, Action::Delete), Err(NotAllowed));
    }
}
