// Dispatch grids are 2-D when a 1-D grid would pass the 65535-workgroups-per-dimension limit
// (ops/engine/src/gpu/recorder.rs groups_1d): workgroups are numbered row after row.

// The flat number of workgroup `wid` in a grid of `nwg` workgroups.
fn flat_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.x + wid.y * nwg.x; }

// The flat index of invocation `lid` of workgroup `wid`, for workgroups of `size` invocations.
fn flat_invocation(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, size: u32) -> u32 {
    return flat_workgroup(wid, nwg) * size + lid;
}

// The same from the global invocation id (x spans nwg.x workgroups of `size`).
fn flat_global(gid: vec3<u32>, nwg: vec3<u32>, size: u32) -> u32 { return gid.x + gid.y * nwg.x * size; }
