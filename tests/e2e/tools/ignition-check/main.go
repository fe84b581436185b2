// ignition-check reads MachineConfig manifests (openshift/machineconfig-*.yaml) and checks
// the Ignition config inside each with Ignition's own parser and validator
// (github.com/coreos/ignition/v2), as the Machine Config Operator would before a node
// applies it; it can also write out a file the config carries, decoded the way Ignition
// decodes it.
//
//	ignition-check validate MANIFEST...
//	    Every MachineConfig's spec.config must parse and validate for its declared
//	    Ignition version with no error and no warning. Prints one line per MachineConfig:
//	    "<name> ignition=<version> file=<path> mode=<octal> bytes=<n>" per file. Exit 1
//	    on the first problem, naming the object and Ignition's report.
//
//	ignition-check extract MANIFEST PATH OUT
//	    Writes the contents of the file PATH of the (one) MachineConfig in MANIFEST to OUT,
//	    decoded from its data URL; exit 1 if there is not exactly one such file.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	v3_0 "github.com/coreos/ignition/v2/config/v3_0"
	v3_1 "github.com/coreos/ignition/v2/config/v3_1"
	v3_2 "github.com/coreos/ignition/v2/config/v3_2"
	v3_3 "github.com/coreos/ignition/v2/config/v3_3"
	v3_4 "github.com/coreos/ignition/v2/config/v3_4"
	v3_5 "github.com/coreos/ignition/v2/config/v3_5"
	"github.com/coreos/vcontext/report"
	"github.com/vincent-petithory/dataurl"
	"gopkg.in/yaml.v3"
)

// The released Ignition specifications: each version is parsed by its own package, which
// refuses a config that declares another version.
var parsers = map[string]func([]byte) (report.Report, error){
	"3.0.0": func(b []byte) (report.Report, error) { _, r, err := v3_0.Parse(b); return r, err },
	"3.1.0": func(b []byte) (report.Report, error) { _, r, err := v3_1.Parse(b); return r, err },
	"3.2.0": func(b []byte) (report.Report, error) { _, r, err := v3_2.Parse(b); return r, err },
	"3.3.0": func(b []byte) (report.Report, error) { _, r, err := v3_3.Parse(b); return r, err },
	"3.4.0": func(b []byte) (report.Report, error) { _, r, err := v3_4.Parse(b); return r, err },
	"3.5.0": func(b []byte) (report.Report, error) { _, r, err := v3_5.Parse(b); return r, err },
}

// machineConfig is the part of a MachineConfig this tool reads; spec.config stays raw for
// Ignition.
type machineConfig struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec struct {
		Config json.RawMessage `json:"config"`
	} `json:"spec"`
}

// ignitionFiles is what the tool reports and extracts: storage.files, common to every 3.x.
type ignitionFiles struct {
	Ignition struct {
		Version string `json:"version"`
	} `json:"ignition"`
	Storage struct {
		Files []struct {
			Path     string `json:"path"`
			Mode     *int   `json:"mode"`
			Contents struct {
				Source      *string `json:"source"`
				Compression *string `json:"compression"`
			} `json:"contents"`
		} `json:"files"`
	} `json:"storage"`
}

func main() {
	var err error
	switch {
	case len(os.Args) >= 3 && os.Args[1] == "validate":
		err = validate(os.Args[2:])
	case len(os.Args) == 5 && os.Args[1] == "extract":
		err = extract(os.Args[2], os.Args[3], os.Args[4])
	default:
		err = errors.New("usage: ignition-check validate MANIFEST... | extract MANIFEST PATH OUT")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ignition-check:", err)
		os.Exit(1)
	}
}

// machineConfigs reads every MachineConfig document of a multi-document YAML file.
func machineConfigs(path string) ([]machineConfig, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []machineConfig
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if doc == nil {
			continue
		}
		js, err := json.Marshal(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		var mc machineConfig
		if err := json.Unmarshal(js, &mc); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if mc.Kind == "MachineConfig" {
			out = append(out, mc)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no MachineConfig", path)
	}
	return out, nil
}

func files(mc machineConfig) (ignitionFiles, error) {
	var f ignitionFiles
	if err := json.Unmarshal(mc.Spec.Config, &f); err != nil {
		return f, fmt.Errorf("MachineConfig %s: spec.config: %w", mc.Metadata.Name, err)
	}
	return f, nil
}

func validate(paths []string) error {
	for _, path := range paths {
		mcs, err := machineConfigs(path)
		if err != nil {
			return err
		}
		for _, mc := range mcs {
			f, err := files(mc)
			if err != nil {
				return err
			}
			parse, ok := parsers[f.Ignition.Version]
			if !ok {
				return fmt.Errorf("MachineConfig %s: Ignition version %q is not a released 3.x specification", mc.Metadata.Name, f.Ignition.Version)
			}
			rpt, err := parse(mc.Spec.Config)
			if err != nil {
				return fmt.Errorf("MachineConfig %s: Ignition refuses spec.config: %v\n%s", mc.Metadata.Name, err, rpt.String())
			}
			if len(rpt.Entries) > 0 {
				return fmt.Errorf("MachineConfig %s: Ignition reports:\n%s", mc.Metadata.Name, rpt.String())
			}
			for _, file := range f.Storage.Files {
				data, err := decode(mc.Metadata.Name, file.Path, file.Contents.Source, file.Contents.Compression)
				if err != nil {
					return err
				}
				mode := "unset"
				if file.Mode != nil {
					mode = fmt.Sprintf("%04o", *file.Mode)
				}
				fmt.Printf("%s ignition=%s file=%s mode=%s bytes=%d\n", mc.Metadata.Name, f.Ignition.Version, file.Path, mode, len(data))
			}
		}
	}
	return nil
}

// decode returns a file's contents from its data URL, as Ignition's own URL handling
// (the dataurl package) reads it. Only inline, uncompressed contents are expected here.
func decode(name, path string, source, compression *string) ([]byte, error) {
	if compression != nil && *compression != "" {
		return nil, fmt.Errorf("MachineConfig %s: %s is %s-compressed", name, path, *compression)
	}
	if source == nil {
		return nil, fmt.Errorf("MachineConfig %s: %s has no contents.source", name, path)
	}
	u, err := dataurl.DecodeString(*source)
	if err != nil {
		return nil, fmt.Errorf("MachineConfig %s: %s: contents.source is not a data URL: %w", name, path, err)
	}
	return u.Data, nil
}

func extract(manifest, path, out string) error {
	mcs, err := machineConfigs(manifest)
	if err != nil {
		return err
	}
	var found [][]byte
	for _, mc := range mcs {
		f, err := files(mc)
		if err != nil {
			return err
		}
		for _, file := range f.Storage.Files {
			if file.Path != path {
				continue
			}
			data, err := decode(mc.Metadata.Name, file.Path, file.Contents.Source, file.Contents.Compression)
			if err != nil {
				return err
			}
			found = append(found, data)
		}
	}
	if len(found) != 1 {
		return fmt.Errorf("%s: %d files at %s, want 1", manifest, len(found), path)
	}
	return os.WriteFile(out, found[0], 0o644)
}
