pub use moekit_moe as moe;
