//! The recipe as a typed DAG: every op resolved in the registry, params checked, every edge
//! type-checked, cycles rejected, and a deterministic execution order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

use op_api::{ArtifactType, Device, Op, Registry};
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{suggestion, Diagnostic};
use crate::recipe::{OpDecl, Recipe};

/// One op of the recipe, ready to plan and run.
pub struct Step {
    pub name: String,
    pub kind: &'static str,
    pub op: Arc<dyn Op>,
    /// Canonical params (defaults filled), as [`Op::check`] returned them.
    pub params: toml::Table,
    /// Port name -> index of the producing step.
    pub inputs: BTreeMap<String, usize>,
    pub output: ArtifactType,
    pub device: Device,
}

/// A validated recipe. Step indices are file order; edges run producer -> consumer.
pub struct Pipeline {
    pub recipe: Recipe,
    pub steps: Vec<Step>,
    pub graph: DiGraph<usize, String>,
    /// Execution order: topological, ties broken by file order.
    pub order: Vec<usize>,
}

impl Pipeline {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// Every step that consumes (directly or not) the output of `start`, `start` included.
    pub fn descendants(&self, start: usize) -> BTreeSet<usize> {
        self.reach(start, petgraph::Direction::Outgoing)
    }

    /// Every step whose output `start` needs (directly or not), `start` included.
    pub fn ancestors(&self, start: usize) -> BTreeSet<usize> {
        self.reach(start, petgraph::Direction::Incoming)
    }

    fn reach(&self, start: usize, direction: petgraph::Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([start]);
        let mut todo = vec![start];
        while let Some(i) = todo.pop() {
            for n in self.graph.neighbors_directed(NodeIndex::new(i), direction) {
                if seen.insert(n.index()) {
                    todo.push(n.index());
                }
            }
        }
        seen
    }
}

/// Resolves and checks everything; returns every problem found, sorted by line.
pub fn build(recipe: Recipe, registry: &Registry) -> Result<Pipeline, Vec<Diagnostic>> {
    let file = recipe.file.clone();
    let mut diags = Vec::new();
    let names: Vec<&str> = recipe.ops.iter().map(|o| o.name.as_str()).collect();

    // Per op: the registry entry and canonical params, when both are valid.
    let mut resolved: Vec<Option<(Arc<dyn Op>, toml::Table)>> = Vec::new();
    for decl in &recipe.ops {
        let Some(op) = registry.get(&decl.kind) else {
            let hint = if registry.kinds().next().is_none() {
                "; no op kinds are registered in this build".to_string()
            } else {
                suggestion(&decl.kind, registry.kinds())
            };
            diags.push(file.at(
                &decl.kind_origin,
                format!(
                    "op `{}`: unknown op kind `{}`{hint} (`runner ops` lists them)",
                    decl.name, decl.kind
                ),
            ));
            resolved.push(None);
            continue;
        };
        match op.check(&decl.params) {
            Ok(params) => resolved.push(Some((op.clone(), params))),
            Err(e) => {
                let origin = e
                    .key
                    .as_ref()
                    .and_then(|k| decl.param_origins.get(k))
                    .unwrap_or(&decl.header);
                diags.push(file.at(
                    origin,
                    format!(
                        "op `{}` ({}): {}{}",
                        decl.name,
                        decl.kind,
                        e.message,
                        param_fix_hint(&e, decl, op.as_ref())
                    ),
                ));
                resolved.push(None);
            }
        }
    }
    let outputs: Vec<Option<ArtifactType>> = resolved
        .iter()
        .map(|r| r.as_ref().map(|(op, params)| op.output(params)))
        .collect();

    let mut graph = DiGraph::<usize, String>::new();
    for i in 0..recipe.ops.len() {
        graph.add_node(i);
    }
    let mut step_inputs: Vec<BTreeMap<String, usize>> = vec![BTreeMap::new(); recipe.ops.len()];
    for (i, decl) in recipe.ops.iter().enumerate() {
        let ports = resolved[i].as_ref().map(|(op, _)| op.inputs());
        for input in &decl.inputs {
            let port = match &ports {
                Some(ports) => match ports.iter().find(|p| p.name == input.port) {
                    Some(p) => Some(p),
                    None => {
                        let hint = if ports.is_empty() {
                            format!("; `{}` takes no inputs", decl.kind)
                        } else {
                            suggestion(&input.port, ports.iter().map(|p| p.name))
                        };
                        diags.push(file.at(
                            &input.port_origin,
                            format!(
                                "op `{}` ({}): unknown input port `{}`{hint}",
                                decl.name, decl.kind, input.port
                            ),
                        ));
                        continue;
                    }
                },
                None => None,
            };
            let Some(from) = names.iter().position(|n| *n == input.from) else {
                diags.push(file.at(
                    &input.from_origin,
                    format!(
                        "op `{}`: input `{}` names `{}`, which is not an op in this recipe{}",
                        decl.name,
                        input.port,
                        input.from,
                        suggestion(&input.from, names.iter().copied())
                    ),
                ));
                continue;
            };
            if let (Some(port), Some(produced)) = (port, outputs[from]) {
                if !port.accepts.contains(&produced) {
                    let accepts: Vec<&str> = port.accepts.iter().map(|t| t.name()).collect();
                    diags.push(file.at(
                        &input.from_origin,
                        format!(
                            "op `{}` ({}): input `{}` accepts {}, but op `{}` ({}) produces {produced}; connect an op that produces {}",
                            decl.name,
                            decl.kind,
                            input.port,
                            accepts.join(" or "),
                            input.from,
                            recipe.ops[from].kind,
                            accepts.join(" or "),
                        ),
                    ));
                }
            }
            graph.add_edge(NodeIndex::new(from), NodeIndex::new(i), input.port.clone());
            step_inputs[i].insert(input.port.clone(), from);
        }
        if let Some(ports) = &ports {
            for port in ports.iter().filter(|p| p.required) {
                if !decl.inputs.iter().any(|inp| inp.port == port.name) {
                    let accepts: Vec<&str> = port.accepts.iter().map(|t| t.name()).collect();
                    diags.push(file.at(
                        &decl.header,
                        format!(
                            "op `{}` ({}): missing required input `{}` ({}); add `inputs = {{ {} = \"OP\" }}` naming an op that produces {}",
                            decl.name,
                            decl.kind,
                            port.name,
                            port.doc,
                            port.name,
                            accepts.join(" or ")
                        ),
                    ));
                }
            }
        }
    }

    diags.extend(cycle_diagnostics(&recipe, &graph));

    if !diags.is_empty() {
        crate::recipe::sort_diagnostics(&mut diags);
        return Err(diags);
    }

    let order = topological_order(&graph);
    let steps = recipe
        .ops
        .iter()
        .zip(resolved)
        .zip(step_inputs)
        .map(|((decl, r), inputs)| {
            let (op, params) = r.expect("no diagnostics means every op resolved");
            Step {
                name: decl.name.clone(),
                kind: op.kind(),
                output: op.output(&params),
                device: op.device(),
                op,
                params,
                inputs,
            }
        })
        .collect();
    Ok(Pipeline {
        recipe,
        steps,
        graph,
        order,
    })
}

/// What to do about a param error, beyond the op's own message.
fn param_fix_hint(e: &op_api::ParamError, decl: &OpDecl, op: &dyn Op) -> String {
    if e.key.is_none() {
        if let Some(spec) = op.params().iter().find(|s| {
            e.message.contains(&format!("`{}`", s.name)) && !decl.params.contains_key(s.name)
        }) {
            return format!(
                "; add `{} = ...` ({}) under [ops.{}]",
                spec.name, spec.ty, decl.name
            );
        }
    }
    String::new()
}

/// Kahn's algorithm, always taking the ready op that comes first in the file, so the order
/// is the one a reader expects and never depends on hashing.
fn topological_order(graph: &DiGraph<usize, String>) -> Vec<usize> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = indegree
        .iter()
        .enumerate()
        .filter(|(_, d)| **d == 0)
        .map(|(i, _)| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for n in graph.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing) {
            indegree[n.index()] -= 1;
            if indegree[n.index()] == 0 {
                ready.push(Reverse(n.index()));
            }
        }
    }
    order
}

/// One diagnostic per cycle, at the input of the cycle's first op (in file order) that closes it.
fn cycle_diagnostics(recipe: &Recipe, graph: &DiGraph<usize, String>) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for scc in tarjan_scc(graph) {
        let members: BTreeSet<usize> = scc.iter().map(|n| n.index()).collect();
        let first = *members.iter().next().expect("an SCC is never empty");
        let self_loop = graph.contains_edge(NodeIndex::new(first), NodeIndex::new(first));
        if members.len() == 1 && !self_loop {
            continue;
        }
        // Walk backwards along inputs (consumer -> producer) inside the SCC until we return to
        // `first`: the path names the ops in the order a reader follows `inputs`.
        let path = cycle_through(graph, &members, first);
        let decl = &recipe.ops[first];
        let mut description = Vec::new();
        for pair in path.windows(2) {
            let (consumer, producer) = (pair[0], pair[1]);
            let port = graph
                .edges_connecting(NodeIndex::new(producer), NodeIndex::new(consumer))
                .next()
                .map(|e| e.weight().as_str())
                .unwrap_or("?");
            description.push(format!(
                "`{}` takes `{port}` from `{}`",
                recipe.ops[consumer].name, recipe.ops[producer].name
            ));
        }
        let names: Vec<&str> = path.iter().map(|i| recipe.ops[*i].name.as_str()).collect();
        let closing_input = decl
            .inputs
            .iter()
            .find(|inp| path.get(1).is_some_and(|p| recipe.ops[*p].name == inp.from))
            .map(|inp| inp.from_origin.clone())
            .unwrap_or_else(|| decl.header.clone());
        out.push(recipe.file.at(
            &closing_input,
            format!(
                "ops form a cycle {}: {}; an op cannot depend on its own output, remove one of these inputs",
                names.join(" -> "),
                description.join(", ")
            ),
        ));
    }
    out
}

/// A shortest cycle from `start` back to itself following edges backwards (consumer -> producer),
/// restricted to `members`. Returned with `start` at both ends.
fn cycle_through(
    graph: &DiGraph<usize, String>,
    members: &BTreeSet<usize>,
    start: usize,
) -> Vec<usize> {
    let mut parent: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(i) = queue.pop_front() {
        let mut producers: Vec<usize> = graph
            .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
            .map(|n| n.index())
            .filter(|n| members.contains(n))
            .collect();
        producers.sort_unstable();
        for p in producers {
            if p == start {
                let mut path = vec![start];
                let mut cur = i;
                let mut back = vec![];
                while cur != start {
                    back.push(cur);
                    cur = parent[&cur];
                }
                path.extend(back.into_iter().rev());
                path.push(start);
                return path;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = parent.entry(p) {
                e.insert(i);
                queue.push_back(p);
            }
        }
    }
    vec![start, start]
}

/// The recipe as Graphviz DOT: one box per op (GPU ops shaded), one edge per input, labelled
/// with the port.
pub fn to_dot(pipeline: &Pipeline) -> String {
    fn quote(s: &str) -> String {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        )
    }
    let mut out = String::new();
    out.push_str(&format!("digraph {} {{\n", quote(&pipeline.recipe.name)));
    out.push_str("  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for &i in &pipeline.order {
        let step = &pipeline.steps[i];
        let style = match step.device {
            Device::Gpu => ", style=filled, fillcolor=\"#cfe2ff\"",
            Device::Cpu => "",
        };
        out.push_str(&format!(
            "  {} [label={}{style}];\n",
            quote(&step.name),
            quote(&format!("{}\n{} -> {}", step.name, step.kind, step.output))
        ));
    }
    for e in pipeline.graph.edge_indices() {
        let (from, to) = pipeline.graph.edge_endpoints(e).expect("edge exists");
        out.push_str(&format!(
            "  {} -> {} [label={}];\n",
            quote(&pipeline.steps[from.index()].name),
            quote(&pipeline.steps[to.index()].name),
            quote(&pipeline.graph[e])
        ));
    }
    out.push_str("}\n");
    out
}
