//! End-to-end tests of the `sysstate` binary against real repositories: local directories,
//! Garage (S3) and Azurite (Azure Blob) started by `scripts/services.sh`, and real filesystems.

mod agent;
mod backends;
mod corruption;
mod crash;
mod creation;
mod damage;
mod doctor;
mod errors;
mod fidelity;
mod format;
mod garage;
mod hostile;
mod inplace;
mod locks;
mod modes;
mod postgres;
mod recovery;
mod roundtrip;
mod secrets;
mod shadow;
mod support;
mod upkeep;
mod vault;
